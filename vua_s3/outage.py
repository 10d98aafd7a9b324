"""What a store outage does to a query: by default a miss (a cache is an optimization),
with one warning per outage; ``strict`` raises instead."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import StoreUnavailableError

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Interrupted(Generic[_T]):
    """A query cut short by an outage: what it verified before the outage, and the outage."""

    partial: _T
    outage: StoreUnavailableError


class OutagePolicy:
    """Bounds each query by ``timeout`` and turns an outage into a miss (or raises when ``strict``).

    Only :class:`StoreUnavailableError` and the timeout count as an outage; every other
    error (access denied, missing bucket, bad input) propagates.
    """

    def __init__(self, where: str, *, strict: bool, timeout: float | None) -> None:
        self._where = where
        self.strict = strict
        self.timeout = timeout
        self._outage: str | None = None

    async def guarded(self, verb: str, work: Awaitable[_T | Interrupted[_T]], miss: _T) -> _T:
        """``work`` bounded by the timeout; an outage gives ``miss``, work cut short by one
        gives what it verified before it; either way the outage is reported."""
        try:
            result = await asyncio.wait_for(work, self.timeout)
        except (StoreUnavailableError, asyncio.TimeoutError) as exc:  # distinct classes on Python 3.10
            self._began(verb, exc)
            return miss
        if isinstance(result, Interrupted):
            self._began(verb, result.outage)
            return result.partial
        if self._outage is not None:
            log.info("store %s answers again; cache hits resume", self._where)
            self._outage = None
        return result

    def _began(self, verb: str, exc: StoreUnavailableError | asyncio.TimeoutError) -> None:
        """Raise when strict; otherwise warn once per outage."""
        reason = str(exc) or f"{verb} took longer than timeout={self.timeout}s"
        if self.strict:
            if isinstance(exc, StoreUnavailableError):
                raise exc
            raise StoreUnavailableError(f"{verb} on {self._where}: {reason}") from None
        if self._outage is None:
            log.warning("store %s is unavailable, serving cache misses until it answers again: %s", self._where, reason)
        self._outage = reason
