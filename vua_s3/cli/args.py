"""Argument types and output formats the commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from .. import checks
from ..keys import check_namespace
from ..units import parse_age, parse_size

_T = TypeVar("_T")

LOCATION_HELP = "store location: s3://bucket/prefix?..., file:///path or a path"


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _argument_type(parse: Callable[[str], _T], name: str) -> Callable[[str], _T]:
    """``parse`` as an argparse type: its ``ValueError`` becomes argparse's usage error."""

    def convert(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in its messages
    return convert


namespace = _argument_type(check_namespace, "namespace")
age = _argument_type(parse_age, "age")
size = _argument_type(parse_size, "size")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


positive_int = _argument_type(lambda text: checks.positive_int("the value", _integer(text)), "positive integer")


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise ValueError(f"the value must be 0 or more, got {value}")
    return value


non_negative_int = _argument_type(_non_negative_int, "non-negative integer")


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers") from None
    return tuple(checks.positive_int("every value", value) for value in values)


positive_ints = _argument_type(_positive_ints, "comma-separated positive integers")


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of minutes") from None
    return checks.positive_seconds("the number of minutes", value)


minutes = _argument_type(_minutes, "minutes")
