"""A circuit breaker: after a store failure, new requests skip the store for a while."""

from __future__ import annotations

import logging
import threading
import time

from .stats import Recorder


class Breaker:
    """Open for ``backoff`` seconds after a failure, doubling (up to ``max_backoff``) while
    failures repeat; the first success resets it. Opening and closing are logged once each,
    so an outage costs one line, not one per request."""

    def __init__(
        self, log: logging.Logger, name: str, where: str, backoff: float, max_backoff: float, stats: Recorder
    ) -> None:
        self._log = log
        self._stats = stats
        self._name = name
        self._where = where
        self._first = backoff
        self._max = max_backoff
        self._backoff = backoff
        self._until = 0.0
        self._failing = False
        self._lock = threading.Lock()

    def allows(self) -> bool:
        """Whether a new request may use the store now."""
        return time.monotonic() >= self._until

    @property
    def is_open(self) -> bool:
        return not self.allows()

    def failed(self, what: str, cause: str) -> None:
        """Record a failure: it opens the breaker unless it is open already."""
        with self._lock:
            now = time.monotonic()
            if now < self._until:
                return
            first = not self._failing
            self._failing = True
            backoff = self._backoff
            self._until = now + backoff
            self._backoff = min(self._max, backoff * 2)
        self._stats.add("breaker_trips")
        if first:
            self._log.warning(
                "%s: %s failed (%s); new requests skip the store for %.0f s, longer while it keeps failing",
                self._name, what, cause, backoff,
            )  # fmt: skip
        else:
            self._log.debug("%s: %s failed again (%s); skipping the store for %.0f s", self._name, what, cause, backoff)

    def succeeded(self) -> None:
        with self._lock:
            recovered = self._failing
            self._failing = False
            self._backoff = self._first
        if recovered:
            self._log.info("%s: %s answers again; requests use the store", self._name, self._where)
