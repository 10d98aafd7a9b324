"""``gc``: expire old fragments and keep a store under a byte cap. It only touches keys of the
fragment layout and re-checks each one right before deleting it, so it is safe while other
clients read and write (a race costs a cache miss, never wrong data). Ages are last-modified
times: the last write, or the last use where readers refresh what they load
(``refresh_after``), which makes the cap evict the least recently used."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from ..keys import check_namespace, is_fragment_key
from ..loop import gather_or_cancel
from ..storage import ObjectInfo, Store, open_store

_GC_BATCH = 256
#: Incomplete writes (multipart uploads, temporary files) older than this are abandoned,
#: unless ``older_than`` says otherwise.
DEFAULT_STALE_AFTER = 3600.0


@dataclass
class GcReport:
    """What a gc run found and did (``dry_run``: what it would have done)."""

    scanned: int = 0
    expired: int = 0
    """Fragments older than the cutoff."""
    over_cap: int = 0
    """Fragments chosen to bring the store under ``max_bytes``, least recently modified (written,
    or refreshed by a reader) first."""
    deleted: int = 0
    bytes_freed: int = 0
    bytes_kept: int = 0
    """Fragment bytes left (per the listing, less what was deleted)."""
    skipped_foreign: int = 0
    """Objects under the prefix that are not fragments: never touched."""
    uploads_aborted: int = 0
    """Incomplete writes removed: S3 multipart uploads, POSIX temporary files."""
    dry_run: bool = False


Progress = Callable[[int, int], None]


async def gc(
    location: str | Store,
    older_than: float | None = None,
    *,
    max_bytes: int | None = None,
    per_namespace: bool = False,
    stale_after: float | None = None,
    namespace: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: float | None = None,
) -> GcReport:
    """Delete fragments last modified more than ``older_than`` seconds ago, then, while the
    fragments left take more than ``max_bytes`` (in all, or in each namespace with
    ``per_namespace``), the least recently modified ones.

    S3 uses LastModified, POSIX the file mtime: the last write, or the last use where readers
    refresh what they load (``refresh_after``), so the cap then evicts the least recently used.
    Only keys of the fragment layout are touched. Each candidate is probed again right before
    its batch is deleted, so a fragment rewritten or refreshed meanwhile by another client is
    kept. Incomplete writes begun more than ``stale_after`` seconds ago (default:
    ``older_than``, else an hour) are removed too: S3 multipart uploads and POSIX temporary
    files left by crashed writers.
    """
    for name, value in (("older_than", older_than), ("max_bytes", max_bytes), ("stale_after", stale_after)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if older_than is None and max_bytes is None:
        raise ValueError("gc needs older_than, max_bytes or both")
    if namespace is not None:
        check_namespace(namespace)
    start = time.time() if now is None else now
    if stale_after is None:
        stale_after = DEFAULT_STALE_AFTER if older_than is None else older_than
    prefix = f"{namespace}/" if namespace else ""
    store = open_store(location)
    report = GcReport(dry_run=dry_run)
    try:
        fragments: list[ObjectInfo] = []
        async for info in store.list(prefix):
            report.scanned += 1
            if is_fragment_key(info.key):
                fragments.append(info)
            else:
                report.skipped_foreign += 1
        kept = fragments
        if older_than is not None:
            cutoff = start - older_than
            expired = [info for info in fragments if info.last_modified < cutoff]
            report.expired = len(expired)
            gone = await _delete(store, expired, lambda listed, now: now.last_modified < cutoff, report, progress)
            kept = [info for info in fragments if info.key not in gone]
        if max_bytes is not None:
            over = _over_cap(kept, max_bytes, per_namespace)
            report.over_cap = len(over)
            # A fragment written or refreshed since the listing is recent now: it stays.
            gone = await _delete(
                store, over, lambda listed, now: now.last_modified <= listed.last_modified, report, progress
            )
            kept = [info for info in kept if info.key not in gone]
        report.bytes_kept = sum(info.size for info in kept)
        report.uploads_aborted = await store.abort_incomplete(prefix, start - stale_after, dry_run=dry_run)
    finally:
        if location is not store:
            await store.close()
    return report


def _over_cap(fragments: list[ObjectInfo], max_bytes: int, per_namespace: bool) -> list[ObjectInfo]:
    """The least recently modified fragments whose removal brings each pool (the whole store,
    or each namespace) to at most ``max_bytes``."""
    pools: dict[str, list[ObjectInfo]] = defaultdict(list)
    for info in fragments:
        pools[info.key.split("/", 1)[0] if per_namespace else ""].append(info)
    chosen = []
    for pool in pools.values():
        excess = sum(info.size for info in pool) - max_bytes
        # Ties (coarse file-system clocks) are broken by key, so a run is repeatable.
        for info in sorted(pool, key=lambda info: (info.last_modified, info.key)):
            if excess <= 0:
                break
            chosen.append(info)
            excess -= info.size
    return chosen


async def _delete(
    store: Store,
    candidates: list[ObjectInfo],
    still_doomed: Callable[[ObjectInfo, ObjectInfo], bool],
    report: GcReport,
    progress: Progress | None,
) -> set[str]:
    """Delete the candidates that, probed again just before, are still doomed; their keys."""
    gone: set[str] = set()
    for start in range(0, len(candidates), _GC_BATCH):
        batch = candidates[start : start + _GC_BATCH]
        current = await store.head_many([c.key for c in batch])
        doomed = [
            now for listed, now in zip(batch, current, strict=True) if now is not None and still_doomed(listed, now)
        ]
        if not report.dry_run:
            await gather_or_cancel(*(store.delete(info.key) for info in doomed))
        gone.update(info.key for info in doomed)
        report.deleted += len(doomed)
        report.bytes_freed += sum(info.size for info in doomed)
        if progress is not None:
            progress(start + len(batch), len(candidates))
    return gone
