"""Moving objects: one group written as one object per KV head, and one object fetched,
checked and placed. The concurrency bound and the receive buffers live here."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import torch

from . import fragment
from .assembly import Assembly, BufferPool
from .errors import AccessDeniedError, FragmentError, ObjectNotFoundError, SizeMismatchError, StoreUnavailableError
from .keys import Group
from .loop import gather_or_cancel, in_thread
from .presence import KnownPresent
from .refresh import Refresher
from .shards import HeadRange
from .storage import ObjectInfo, Store

log = logging.getLogger(__name__)


class ObjectIO:
    """Reads and writes of fragment objects, at most ``max_inflight`` at once per event loop.

    What it writes and what turns out missing is told to ``known``, so later probes and
    puts need not ask the store again.
    """

    def __init__(
        self, store: Store, known: KnownPresent, max_inflight: int, *, refresher: Refresher | None = None
    ) -> None:
        self._store = store
        self._known = known
        self._refresher = refresher
        self.max_inflight = max_inflight
        self.pool = BufferPool(keep=max_inflight)
        self._limits: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def _limit(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        limit = self._limits.get(loop)
        if limit is None:
            limit = self._limits[loop] = asyncio.Semaphore(self.max_inflight)
        return limit

    # ------------------------------------------------------------------ writes

    async def write_group(
        self, encoder: fragment.Encoder, kv_start: int, ids: torch.Tensor, group: Group, heads: HeadRange
    ) -> None:
        """One object per head, the representative last, so finding it means this writer
        stored the rest."""
        await gather_or_cancel(*(self._write_head(encoder, kv_start, ids, group, heads, h) for h in heads.rest))
        await self._write_head(encoder, kv_start, ids, group, heads, heads.representative)

    async def _write_head(
        self, encoder: fragment.Encoder, kv_start: int, ids: torch.Tensor, group: Group, heads: HeadRange, head: int
    ) -> None:
        """One object: it goes out as views of the caller's tensors. Host memory is encoded
        on the loop (slicing views and a CRC that releases the GIL: handing each object to a
        thread costs more in GIL hand-offs); device memory is copied out on a thread."""
        key = group.key(head)
        encode = functools.partial(
            encoder.encode,
            group.start - kv_start,
            ids[group.start : group.stop],
            group.metadata(),
            head=head,
            kv_heads=heads.total,
        )
        async with self._limit():
            segments = await asyncio.to_thread(encode) if encoder.needs_host_copy else encode()
            await self._store.put_segments(key, segments)
        self._known.add(ObjectInfo(key=key, size=sum(map(len, segments)), last_modified=time.time()))

    # ------------------------------------------------------------------ reads

    async def load_group(self, group: Group, index: int, size: int, ids: torch.Tensor, assembly: Assembly) -> bool:
        """Fetch, check and place every head of one group at position ``index``; ``False``
        (logged) if any cannot be used. ``size`` is the representative's (all heads of a
        group have one size). Without a known head count, the rest follow the first
        group's representative, which tells it."""
        first = assembly.representative
        if assembly.heads is not None:
            order = [first, *assembly.heads.rest]
            loaded = await gather_or_cancel(*(self._load_head(group, h, index, size, ids, assembly) for h in order))
            return self._used(group, order, all(loaded))
        if not await self._load_head(group, first, index, size, ids, assembly):
            return False
        heads = await assembly.layout()
        if heads is None:
            return False
        rest = await gather_or_cancel(*(self._load_head(group, h, index, size, ids, assembly) for h in heads.rest))
        return self._used(group, [first, *heads.rest], all(rest))

    def _used(self, group: Group, heads: list[int], loaded: bool) -> bool:
        """``loaded``; a group loaded whole counts as used."""
        if loaded:
            self.used([group], heads)
        return loaded

    def used(self, groups: Sequence[Group], heads: Sequence[int]) -> None:
        """Groups (these heads of them) a caller used: handed to the refresher, which returns at
        once. A caller that holds the first groups of a chain itself tells them too, so they do
        not expire before the groups after them."""
        if self._refresher is not None:
            for group in groups:
                self._refresher.used(group.keys(heads))

    async def _load_head(
        self, group: Group, head: int, index: int, size: int, ids: torch.Tensor, assembly: Assembly
    ) -> bool:
        """Fetch, check and place one object; ``False`` (logged) if it cannot be used."""
        key = group.key(head)
        placed = False
        async with self._limit():
            fetched = await self._fetch(key, size, assembly.pinned)
            try:
                if fetched is None:
                    return False
                try:
                    frag = await in_thread(fragment.decode, fetched[1])
                    group.check(frag, ids, head)
                except FragmentError as exc:
                    log.warning("fragment %s in %s is unusable, treated as a miss: %s", key, self._store.url, exc)
                    return False
                placed = await assembly.place(index, frag)
                return placed
            finally:
                if index == 0 and head == assembly.representative and not placed:
                    assembly.abandon()
                if fetched is not None:
                    self.pool.give(fetched[0], assembly.pinned)

    async def _fetch(self, key: str, size: int, pinned: bool) -> tuple[torch.Tensor, memoryview] | None:
        """The object in a pooled buffer, or ``None`` (logged) if it is gone. If its size is
        not the probe's (a remembered probe, rewritten since), it is probed once more."""
        for attempt in range(2):
            buf = self.pool.take(size, pinned)
            view = buf.numpy().data[:size]
            try:
                await self._store.get_into(key, view)
                return buf, view
            except BaseException as exc:
                self.pool.give(buf, pinned)
                if not isinstance(exc, (ObjectNotFoundError, SizeMismatchError)):
                    raise
                if isinstance(exc, ObjectNotFoundError):
                    self._known.add_missing(key)
                else:
                    self._known.discard(key)
                if isinstance(exc, SizeMismatchError) and not attempt:
                    info = (await self._store.head_many([key]))[0]
                    if info is not None:
                        size = info.size
                        continue
                if isinstance(exc, SizeMismatchError) and attempt:
                    log.warning("fragment %s in %s is unusable, treated as a miss: %s", key, self._store.url, exc)
                else:
                    log.info("fragment %s vanished after the probe (expired or deleted)", key)
                return None
        raise AssertionError("unreachable")


async def settle_prefix(loads: list[Coroutine[Any, Any, bool]]) -> tuple[int, StoreUnavailableError | None]:
    """Run one load per group; how many leading groups loaded, and the outage that ended
    them if one did. A group that fails with an outage ends the prefix there: the loads
    after it are cancelled, the ones before it finish. So does a refused group after the
    first (that object is unreadable to us; the credentials work); a refused first group
    and any other error cancel all and raise."""
    tasks = [asyncio.ensure_future(load) for load in loads]
    end, outage = len(tasks), None
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                number = tasks.index(task)
                if exc is None or number >= end:
                    continue
                if isinstance(exc, AccessDeniedError) and number:
                    log.warning("fragment %d is refused, the prefix ends there: %s", number, exc)
                elif not isinstance(exc, StoreUnavailableError):
                    raise exc
                end, outage = number, exc if isinstance(exc, StoreUnavailableError) else None
                for later in tasks[number + 1 :]:
                    later.cancel()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    loaded = [task.result() for task in tasks[:end]]
    return next((i for i, ok in enumerate(loaded) if not ok), end), outage
