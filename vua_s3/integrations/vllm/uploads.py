"""Group uploads the scheduler planned, until every writing rank has reported its part.

Each tensor-parallel rank uploads its own heads of a group (each pipeline stage its own
layers), and vLLM sums what every worker reports, so a group is counted stored (and its
KV event published) here, once per engine, when the last writing rank says it stored its
heads; if any rank failed, the group is not stored (a reader needs every head). A stored
group's object sizes, one per stage, are what a lookup would have found: the scheduler
trusts them as it trusts a lookup's answer. Pure: no vLLM import.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class Settled(NamedTuple):
    """One rank's report of one group upload that ended."""

    req_id: str
    group: int
    stage: int
    size: int | None
    """The size of each of its objects (every head of a group has one), ``None`` if not stored."""


@dataclass
class _Pending(Generic[T]):
    key: bytes
    left: int
    event: T | None
    sizes: dict[int, int] = field(default_factory=dict)
    ok: bool = True


class Uploads(Generic[T]):
    """Groups queued for upload, keyed by request and group number, each with its stage-0
    digest and the event to publish once it is stored."""

    def __init__(self, writers: int, stages: int = 1) -> None:
        if writers < 1 or stages < 1:
            raise ValueError(f"writers and stages must be at least 1, not {writers} and {stages}")
        self._writers, self._stages = writers, stages
        self._pending: dict[tuple[str, int], _Pending[T]] = {}

    def queued(self, req_id: str, group: int, key: bytes, event: T | None) -> None:
        self._pending[req_id, group] = _Pending(key, self._writers * self._stages, event)

    def settled(self, reports: Iterable[Settled]) -> tuple[list[tuple[bytes, tuple[int, ...]]], list[T]]:
        """Fold the workers' reports in: the groups every writer has now stored, as
        ``(stage-0 digest, object size per stage)``, and their events."""
        stored, events = [], []
        for report in reports:
            pending = self._pending.get((report.req_id, report.group))
            if pending is None:
                continue
            pending.left -= 1
            if report.size is None:
                pending.ok = False
            else:
                pending.sizes[report.stage] = report.size
            if pending.left:
                continue
            del self._pending[report.req_id, report.group]
            if pending.ok:
                stored.append((pending.key, tuple(pending.sizes[stage] for stage in range(self._stages))))
                if pending.event is not None:
                    events.append(pending.event)
        return stored, events

    def __len__(self) -> int:
        return len(self._pending)
