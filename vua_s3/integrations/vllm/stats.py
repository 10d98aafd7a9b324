"""The connector's counters: what each side measured since vLLM last asked.

Plain dictionaries, so they cross vLLM's process boundaries as they are. Counters add
up (across workers and intervals); gauges keep the largest value seen (the backlog of
the busiest worker, the breaker of the scheduler). vLLM sums what every worker reports,
so a counter about requests or groups is counted in one place only (the scheduler, or
the first worker), never once per tensor-parallel rank.
"""

from __future__ import annotations

import threading

#: name -> (kind, help). Every name is exported as ``vllm:vua_s3_<name>``.
METRICS: dict[str, tuple[str, str]] = {
    "lookups": ("counter", "Prompts looked up in the store"),
    "lookup_seconds": ("counter", "Time from a lookup's submission to its answer, summed"),
    "lookup_wait_seconds": ("counter", "Time the scheduler waited for lookups (at most lookup_wait_s each), summed"),
    "lookup_heads": ("counter", "Groups lookups asked the store about (one LIST or HEAD each on S3)"),
    "lookup_failures": ("counter", "Lookups that failed (the request was prefilled as a miss)"),
    "lookups_skipped": ("counter", "Requests that skipped the store while the breaker was open"),
    "hit_tokens": ("counter", "Prompt tokens found in the store beyond the local prefix cache"),
    "miss_tokens": ("counter", "Prompt tokens looked up and not found"),
    "breaker_trips": ("counter", "Times a store failure opened the breaker"),
    "breaker_open": ("gauge", "1 while new requests skip the store after a failure"),
    "loaded_tokens": ("counter", "Tokens written into vLLM's paged cache from the store"),
    "load_bytes": ("counter", "Fragment bytes read from the store"),
    "load_seconds": ("counter", "Time loads took, from submission to the last fragment, summed"),
    "load_failures": ("counter", "Groups that could not be loaded (vLLM recomputed them)"),
    "stored_groups": ("counter", "Groups uploaded to the store"),
    "store_bytes": ("counter", "Fragment bytes uploaded to the store"),
    "store_seconds": ("counter", "Time uploads took, from capture to the last fragment, summed"),
    "store_failures": ("counter", "Uploads of a rank's heads of a group that failed, summed over ranks"),
    "dropped_saves": ("counter", "Saves a rank dropped because its upload backlog was full, summed over ranks"),
    "loads_cancelled": ("counter", "Loads stopped because their request finished or was aborted first"),
    "refreshes": ("counter", "Refresh requests for fragments loads read (refresh_after), counted once answered"),
    "refresh_failures": ("counter", "Refreshes that failed (those fragments expire by their last write)"),
    "backlog_bytes": ("gauge", "KV bytes captured and not yet uploaded"),
}


def merge(into: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """Fold ``other`` into ``into`` (counters add, gauges take the maximum)."""
    for name, value in other.items():
        if METRICS[name][0] == "gauge":
            into[name] = max(into.get(name, value), value)
        else:
            into[name] = into.get(name, 0) + value
    return into


class Recorder:
    """Thread-safe accumulation: the loop thread records, vLLM's thread takes. A gauge
    is reported when it changed, so idle steps send nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}
        self._gauges: dict[str, float] = {}

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            if self._gauges.get(name) != value:
                self._gauges[name] = self._values[name] = value

    def level(self, name: str, value: float) -> None:
        """A gauge reported at every take while it is not zero (a log interval or a new
        scrape that saw nothing else still shows it), and once when it returns to zero."""
        with self._lock:
            if value or self._gauges.get(name, 0) != value:
                self._gauges[name] = self._values[name] = value

    def take(self) -> dict[str, float]:
        """Everything recorded since the last call."""
        with self._lock:
            values, self._values = self._values, {}
        return values
