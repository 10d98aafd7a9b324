"""Group uploads the scheduler planned, until every writing rank has reported its part.

Each tensor-parallel rank uploads its own heads of a group, and vLLM sums what every
worker reports, so a group is counted stored (and its KV event published) here, once per
engine, when the last writing rank says it stored its heads; if any rank failed, the
group is not stored (a reader needs every head). Pure: no vLLM import.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Pending(Generic[T]):
    left: int
    ok: bool
    event: T | None


class Uploads(Generic[T]):
    """Groups queued for upload, keyed by request and group number, each with the event to
    publish once it is stored."""

    def __init__(self, writers: int) -> None:
        if writers < 1:
            raise ValueError(f"writers must be at least 1, not {writers}")
        self._writers = writers
        self._pending: dict[tuple[str, int], _Pending[T]] = {}

    def queued(self, req_id: str, group: int, event: T | None) -> None:
        self._pending[req_id, group] = _Pending(self._writers, True, event)

    def settled(self, reports: Iterable[tuple[str, int, bool]]) -> tuple[int, list[T]]:
        """Fold the workers' ``(request, group, stored)`` reports in: how many groups every
        writer has now stored, and their events."""
        stored, events = 0, []
        for req_id, group, ok in reports:
            pending = self._pending.get((req_id, group))
            if pending is None:
                continue
            pending.left -= 1
            pending.ok = pending.ok and ok
            if pending.left:
                continue
            del self._pending[req_id, group]
            if pending.ok:
                stored += 1
                if pending.event is not None:
                    events.append(pending.event)
        return stored, events

    def __len__(self) -> int:
        return len(self._pending)
