"""Sizes and ages as people write them on a command line or in a URL (``16MiB``, ``7d``)."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """``"16MiB"``, ``"8m"``, ``"1048576"`` -> bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (use e.g. 16MiB, 8m or a byte count)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)[:1].lower()]


def parse_age(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` -> seconds."""
    match = _AGE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not an age: use a number and a unit s, m, h, d or w (e.g. 7d)")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]
