"""Each kind of store problem logged once, with its cause; repeats go to debug."""

from __future__ import annotations

import logging
import threading


class Problems:
    def __init__(self, log: logging.Logger, name: str) -> None:
        self._log = log
        self._name = name
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def report(self, what: str, exc: BaseException, consequence: str) -> None:
        key = (what, type(exc).__name__)
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        if first:
            self._log.warning(
                "%s: %s failed (%s: %s); %s. Further %s errors of this kind are logged at debug level.",
                self._name, what, type(exc).__name__, exc, consequence, what,
            )  # fmt: skip
        else:
            self._log.debug("%s: %s failed again (%s: %s)", self._name, what, type(exc).__name__, exc)
