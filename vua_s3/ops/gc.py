"""``gc``: expire old fragments. It only touches keys of the fragment layout and re-checks each
one right before deleting it, so it is safe while other clients read and write (a race costs a
cache miss, never wrong data)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..keys import check_namespace, is_fragment_key
from ..loop import gather_or_cancel
from ..storage import ObjectInfo, Store, open_store

_GC_BATCH = 256


@dataclass
class GcReport:
    """What a gc run found and did (``dry_run``: what it would have done)."""

    scanned: int = 0
    expired: int = 0
    deleted: int = 0
    bytes_freed: int = 0
    skipped_foreign: int = 0
    """Objects under the prefix that are not fragments: never touched."""
    uploads_aborted: int = 0
    dry_run: bool = False


Progress = Callable[[int, int], None]


async def gc(
    location: str | Store,
    older_than: float,
    *,
    namespace: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: float | None = None,
) -> GcReport:
    """Delete fragments last modified more than ``older_than`` seconds ago.

    S3 uses LastModified, POSIX the file mtime. Only keys of the fragment layout are
    touched. Each candidate is probed again right before its batch is deleted, so a
    fragment rewritten meanwhile by another client is kept. Incomplete writes begun
    before the cutoff (S3 multipart uploads left by crashed writers) are aborted too.
    """
    if older_than < 0:
        raise ValueError(f"older_than must not be negative, got {older_than}")
    if namespace is not None:
        check_namespace(namespace)
    cutoff = (time.time() if now is None else now) - older_than
    store = open_store(location)
    report = GcReport(dry_run=dry_run)
    try:
        candidates: list[ObjectInfo] = []
        async for info in store.list(f"{namespace}/" if namespace else ""):
            report.scanned += 1
            if not is_fragment_key(info.key):
                report.skipped_foreign += 1
            elif info.last_modified < cutoff:
                candidates.append(info)
        report.expired = len(candidates)
        for start in range(0, len(candidates), _GC_BATCH):
            batch = candidates[start : start + _GC_BATCH]
            current = await store.head_many([c.key for c in batch])
            doomed = [info for info in current if info is not None and info.last_modified < cutoff]
            if not dry_run:
                await gather_or_cancel(*(store.delete(info.key) for info in doomed))
            report.deleted += len(doomed)
            report.bytes_freed += sum(info.size for info in doomed)
            if progress is not None:
                progress(start + len(batch), len(candidates))
        prefix = f"{namespace}/" if namespace else ""
        report.uploads_aborted = await store.abort_incomplete(prefix, cutoff, dry_run=dry_run)
    finally:
        if location is not store:
            await store.close()
    return report
