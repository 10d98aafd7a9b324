"""Moving objects: one group written as one object per KV head, and one object fetched,
checked and placed. The concurrency bound and the receive buffers live here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import struct
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import torch

from . import fragment
from .assembly import Assembly, BufferPool, Stage
from .errors import AccessDeniedError, FragmentError, ObjectNotFoundError, SizeMismatchError, StoreUnavailableError
from .keys import Group
from .loop import gather_or_cancel, in_thread
from .presence import KnownPresent
from .refresh import Refresher
from .shards import HeadRange
from .storage import ObjectInfo, Store

log = logging.getLogger(__name__)

try:
    from awscrt.checksums import combine_crc32c as _combine
    from awscrt.checksums import crc32c as _crc32c
except ImportError:  # installed without its dependencies: objects carry zlib's CRC-32
    _combine = None


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
        self.pool = BufferPool(keep=max_inflight + 1)  # the most buffers of one class in use at once
        self._limits: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._stages: dict[tuple[asyncio.AbstractEventLoop, int], asyncio.Semaphore] = {}

    def _limit(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        limit = self._limits.get(loop)
        if limit is None:
            limit = self._limits[loop] = asyncio.Semaphore(self.max_inflight)
        return limit

    # ------------------------------------------------------------------ writes

    async def write_group(
        self, encoder: fragment.Encoder, kv_start: int, ids: torch.Tensor, group: Group, heads: HeadRange
    ) -> int:
        """One object per head, the representative last, so finding it means this writer
        stored the rest; the representative's size (every head of a group has it)."""
        await gather_or_cancel(*(self._write_head(encoder, kv_start, ids, group, heads, h) for h in heads.rest))
        return await self._write_head(encoder, kv_start, ids, group, heads, heads.representative)

    async def _write_head(
        self, encoder: fragment.Encoder, kv_start: int, ids: torch.Tensor, group: Group, heads: HeadRange, head: int
    ) -> int:
        """One object, whose size it returns: it goes out as views of the caller's tensors.
        Host memory is encoded on the loop (slicing views and a CRC that releases the GIL:
        handing each object to a thread costs more in GIL hand-offs); device memory is
        copied out on a thread."""
        key = group.key(head)
        encode = functools.partial(
            encoder.encode,
            group.start - kv_start,
            group.tokens(ids),
            group.metadata(),
            head=head,
            kv_heads=heads.total,
        )
        async with self._limit():
            segments = await asyncio.to_thread(encode) if encoder.needs_host_copy else encode()
            crc = object_crc32c(segments)
            if crc is None:
                await self._store.put_segments(key, segments)
            else:
                await self._store.put_checked(key, segments, crc)
        size = sum(map(len, segments))
        self._known.add(ObjectInfo(key=key, size=size, last_modified=time.time()))
        return size

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
        placed = False
        async with self._limit():
            fetched = await self._fetch(group.key(head), size, assembly.pinned)
            try:
                frag = None if fetched is None else await self._checked(group, head, fetched[1], ids)
                if frag is not None:
                    placed = await assembly.place(index, frag)
                return placed
            finally:
                if index == 0 and head == assembly.representative and not placed:
                    assembly.abandon()
                if fetched is not None:
                    self.pool.give(fetched[0], assembly.pinned)

    async def kv_heads(self, group: Group, size: int, ids: torch.Tensor, pinned: bool) -> int | None:
        """The model's KV head count, as ``group``'s representative (head 0) tells; ``None``
        (logged) if that object is unusable. For loads that do not know it yet."""
        async with self._limit():
            fetched = await self._fetch(group.key(0), size, pinned)
            if fetched is None:
                return None
            try:
                frag = await self._checked(group, 0, fetched[1], ids)
                return None if frag is None else frag.kv_heads
            finally:
                self.pool.give(fetched[0], pinned)

    @contextlib.asynccontextmanager
    async def staged(
        self, group: Group, size: int, ids: torch.Tensor, heads: HeadRange, *, pinned: bool, dense: bool
    ) -> AsyncIterator[torch.Tensor | None]:
        """Every head of ``group`` fetched and checked into one pooled stage; yields the
        group's KV (``[layers, 2, heads.count, S, head_dim]``), or ``None`` (logged) if a
        head is unusable. Valid inside the block only: the stage is reused after it.

        By default the objects land side by side and the KV is a strided view of them
        (:class:`Stage`, no copy). ``dense``: each object is copied on into one
        contiguous pooled tensor (what a GPU receives in one asynchronous copy; with
        ``pinned``, page-locked). Stages in use at once are bounded, so the memory they
        hold is about ``max_inflight`` objects more than the receive buffers'."""
        async with self._stage_limit(heads.count):
            if dense:
                async with self._dense(group, size, ids, heads, pinned) as kv:
                    yield kv
                return
            buf = self.pool.take(Stage.capacity(heads, size), pinned)
            try:
                stage = Stage(buf, heads, size)
                fetches = (self._fetch_checked_into(group, h, stage.slot(h), ids) for h in heads.heads)
                frags = await gather_or_cancel(*fetches)
                kv = None if any(f is None for f in frags) else stage.kv([f for f in frags if f is not None])
                if kv is not None:
                    self.used([group], list(heads.heads))
                yield kv
            finally:
                self.pool.give(buf, pinned)

    @contextlib.asynccontextmanager
    async def _dense(
        self, group: Group, size: int, ids: torch.Tensor, heads: HeadRange, pinned: bool
    ) -> AsyncIterator[torch.Tensor | None]:
        """The dense stage: pooled receive buffers, then one pooled contiguous output."""
        taken: list[torch.Tensor] = []

        def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            nbytes = math.prod(shape) * dtype.itemsize
            taken.append(self.pool.take(nbytes, pinned))
            return taken[-1][:nbytes].view(dtype).view(shape)

        staging = Assembly(1, group.split_factor, torch.device("cpu"), heads, pinned=pinned, allocate=allocate)
        try:
            loaded = await self.load_group(group, 0, size, ids, staging)
            yield staging.output() if loaded else None
        finally:
            for buf in taken:
                self.pool.give(buf, pinned)

    def _stage_limit(self, heads: int) -> asyncio.Semaphore:
        """Stages of ``heads`` objects in use at once on this loop: enough to keep
        ``max_inflight`` objects in flight while one more group is handed over."""
        key = (asyncio.get_running_loop(), heads)
        limit = self._stages.get(key)
        if limit is None:
            limit = self._stages[key] = asyncio.Semaphore(-(-self.max_inflight // heads) + 1)
        return limit

    async def _fetch_checked_into(
        self, group: Group, head: int, slot: memoryview, ids: torch.Tensor
    ) -> fragment.Fragment | None:
        """One object into ``slot``, decoded and checked; ``None`` (logged) if unusable.
        Its size is fixed by the slot: an object rewritten to another size is a miss."""
        key = group.key(head)
        async with self._limit():
            try:
                await self._store.get_into(key, slot)
            except (ObjectNotFoundError, SizeMismatchError) as exc:
                self._gone(key, exc)
                return None
            return await self._checked(group, head, slot, ids)

    async def _checked(self, group: Group, head: int, data: memoryview, ids: torch.Tensor) -> fragment.Fragment | None:
        """``data`` decoded as KV head ``head`` of ``group``; ``None`` (logged) if unusable."""
        try:
            frag = await in_thread(fragment.decode, data)
            group.check(frag, ids, head)
        except FragmentError as exc:
            log.warning("fragment %s in %s is unusable, treated as a miss: %s", group.key(head), self._store.url, exc)
            return None
        return frag

    def _gone(self, key: str, exc: ObjectNotFoundError | SizeMismatchError) -> None:
        """What a fetch that found no usable object tells the presence cache (and the log)."""
        if isinstance(exc, ObjectNotFoundError):
            self._known.add_missing(key)
            log.info("fragment %s vanished after the probe (expired or deleted)", key)
        else:
            self._known.discard(key)
            log.warning("fragment %s in %s is unusable, treated as a miss: %s", key, self._store.url, exc)

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
                if isinstance(exc, SizeMismatchError) and not attempt:
                    self._known.discard(key)
                    info = (await self._store.head_many([key]))[0]
                    if info is not None:
                        size = info.size
                        continue
                    exc = ObjectNotFoundError(key)
                self._gone(key, exc)
                return None
        raise AssertionError("unreachable")


def object_crc32c(segments: list[memoryview]) -> int | None:
    """The CRC-32C of a whole encoded object, from its header and the data section's
    CRC-32C, which the header states: no second pass over the data. ``None`` for objects
    checked with zlib's CRC-32 (no awscrt)."""
    if _combine is None:
        return None
    header = segments[0]
    (length,) = struct.unpack_from("<Q", header)
    stated = json.loads(bytes(header[8 : 8 + length]))["__metadata__"].get("crc32c")
    if stated is None:
        return None
    return int(_combine(_crc32c(header), int(stated, 16), sum(len(s) for s in segments[1:])))


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
