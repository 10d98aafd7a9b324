"""Bounded, short-lived memory of groups by digest: what the scheduler side trusts as stored
without asking the store again, and what it already asked a worker to upload."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

_V = TypeVar("_V")


class Recent(Generic[_V]):
    """At most ``capacity`` entries, each for ``ttl`` seconds from when it was last put;
    the least recently put go first. An expired entry is as good as absent."""

    def __init__(self, capacity: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, _V]] = OrderedDict()

    def get(self, key: bytes) -> _V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry[0] > self._ttl:
            del self._entries[key]
            return None
        return entry[1]

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    def put(self, key: bytes, value: _V) -> None:
        self._entries[key] = (self._clock(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
