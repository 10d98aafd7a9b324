"""Checks of settings values shared by the verbs, the store settings, the integrations and the
command line: each bad value is refused with an error that names it."""

from __future__ import annotations


def positive_int(what: str, value: object) -> int:
    """``value`` if it is a positive ``int`` (not a bool), else a :class:`ValueError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def positive_seconds(what: str, value: object) -> float:
    """``value`` if it is a finite positive number of seconds, else a :class:`ValueError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def optional_seconds(what: str, value: object) -> float | None:
    """``None`` (no bound, or off), or a positive number of seconds."""
    return None if value is None else positive_seconds(what, value)


def flag(what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return value
