"""A bounded, short-lived map: what was recently seen, trusted for a while and then asked
again. The presence cache of each cache object and the vLLM scheduler side's trusted groups
and upload marks are all one of these."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class Recent(Generic[_K, _V]):
    """At most ``capacity`` entries, each for ``ttl`` seconds from when it was last put; the
    least recently put (or, with ``touch``, used) go first. An expired entry is as good as
    absent."""

    def __init__(self, capacity: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[_K, tuple[float, _V]] = OrderedDict()

    def entry(self, key: _K, *, touch: bool = False) -> tuple[_V] | None:
        """``(value,)`` while ``key`` is fresh, else ``None`` (the value itself may be ``None``)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry[0] > self._ttl:
            del self._entries[key]
            return None
        if touch:
            self._entries.move_to_end(key)
        return (entry[1],)

    def get(self, key: _K) -> _V | None:
        entry = self.entry(key)
        return None if entry is None else entry[0]

    def __contains__(self, key: _K) -> bool:
        return self.entry(key) is not None

    def put(self, key: _K, value: _V) -> None:
        self._entries[key] = (self._clock(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, key: _K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
