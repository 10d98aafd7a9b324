"""``doctor``: can this location hold a cache? It tries every request vua_s3 makes, on a
scratch key under the store's prefix, and says how to fix each failure. Each backend's
checks live in their own module, chosen by one table; any other
:class:`~vua_s3.storage.Store` gets the cache's own round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ...errors import InvalidLocationError
from ...storage import Location, Store, open_store
from ...storage.posix import PosixStore
from ...storage.s3 import S3Store
from .common import FAIL, PASS, SKIP, WARN, Check, format_checks, fragment_round_trip
from .posix import posix_checks
from .s3 import s3_checks

__all__ = ["FAIL", "PASS", "SKIP", "WARN", "Check", "doctor", "format_checks"]


def doctor(location: Location) -> list[Check]:
    """Check that ``location`` can hold a cache; every failure comes with its fix."""
    try:
        store = open_store(location)
    except (InvalidLocationError, ValueError) as exc:
        return [Check("location", FAIL, str(exc), "correct the URL (see `vua-s3 doctor --help`)")]
    return _checks_for(store)


def _checks_for(store: Store) -> list[Check]:
    """The checks of ``store``'s backend (the nearest class in its MRO that has its own)."""
    backends: dict[type[Store], Callable[[Any], list[Check]]] = {
        S3Store: s3_checks,
        PosixStore: lambda store: asyncio.run(posix_checks(store)),
    }
    for cls in type(store).__mro__:
        if cls in backends:
            return backends[cls](store)
    return [Check("backend", PASS, type(store).__name__), asyncio.run(fragment_round_trip(store))]
