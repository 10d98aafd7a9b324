"""The cache API: store KV caches by token prefix, find and load the longest stored prefix."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar, overload

import torch

from . import fragment
from .config import VUAConfig
from .errors import FragmentError, ObjectNotFoundError, SizeMismatchError, StoreUnavailableError
from .fragment import KVCache
from .keys import fragment_key, group_digests, token_ids
from .loop import BackgroundLoop, gather_or_cancel
from .storage import ObjectInfo, Store, open_store

log = logging.getLogger(__name__)

Location = str | os.PathLike[str] | Store
_T = TypeVar("_T")

#: Default bound on one ``get_closest``/``lookup`` query, seconds: past it the query is a miss.
DEFAULT_TIMEOUT = 30.0


class ClosestKV(NamedTuple):
    """The longest stored prefix of a query.

    ``tokens`` is the matched prefix (1-D, the query's dtype); ``data`` is one
    ``(K, V)`` pair per layer, each ``[1, heads, len(tokens), head_dim]``.
    """

    tokens: torch.Tensor
    data: list[tuple[torch.Tensor, torch.Tensor]]


class _Group(NamedTuple):
    """One group of one sequence: where it lives and what it must contain."""

    key: str
    digest: bytes
    parent: bytes | None
    number: int


class _KnownPresent:
    """Keys this object just stored or found, with their sizes: lets a probe skip the HEAD.

    Bounded (least recently used go first) and short-lived: an object can vanish by
    lifecycle expiry or a ``gc`` elsewhere, so a hit is trusted for ``ttl`` seconds at
    most. Misses are never cached. A stale hit costs little: ``get_closest`` treats a
    vanished fragment as the end of the prefix and forgets it.
    """

    def __init__(self, capacity: int = 4096, ttl: float = 30.0) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._entries: OrderedDict[str, tuple[float, ObjectInfo]] = OrderedDict()

    def get(self, key: str) -> ObjectInfo | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if time.monotonic() - entry[0] > self._ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def add(self, info: ObjectInfo) -> None:
        self._entries[info.key] = (time.monotonic(), info)
        self._entries.move_to_end(info.key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class _BufferPool:
    """Receive buffers kept for reuse.

    Fresh memory costs a page fault per 4 KiB when first written (on small VMs as much CPU
    as the transfer itself; README, "Performance"); reused memory does not.
    Buffers are pinned when the destination is CUDA, so the host-to-device copy can run
    asynchronously. At most ``keep`` idle buffers are kept per size class.
    """

    _GRAIN = 1 << 20  # fragments of one model differ by a few header bytes: one class

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}

    def take(self, size: int, pinned: bool) -> torch.Tensor:
        capacity = -(-size // self._GRAIN) * self._GRAIN
        free = self._free.get((capacity, pinned))
        if free:
            return free.pop()
        return torch.empty(capacity, dtype=torch.uint8, pin_memory=pinned)

    def give(self, buf: torch.Tensor, pinned: bool) -> None:
        free = self._free.setdefault((buf.numel(), pinned), [])
        if len(free) < self._keep:
            free.append(buf)


class _Assembly:
    """One query's fragments, copied into one output tensor as each arrives.

    Group 0 fixes the layout and allocates the output; later groups wait for it (their
    downloads do not) and end the prefix if their layout differs. One copy per fragment
    into the output: a non-blocking host-to-device copy from pinned memory for CUDA.
    """

    def __init__(self, groups: int, size: int, device: torch.device) -> None:
        self._groups = groups
        self._size = size
        self._device = device
        self._out: asyncio.Future[torch.Tensor | None] = asyncio.get_running_loop().create_future()

    @property
    def pinned(self) -> bool:
        return self._device.type == "cuda"

    def abandon(self) -> None:
        """Group 0 is unusable: nothing after it can be used either."""
        if not self._out.done():
            self._out.set_result(None)

    async def place(self, number: int, frag: fragment.Fragment) -> bool:
        if number == 0:
            layers, two, heads, _, head_dim = frag.kv.shape
            shape = (layers, two, heads, self._size * self._groups, head_dim)
            out = await asyncio.to_thread(torch.empty, shape, dtype=frag.kv.dtype, device=self._device)
            self._out.set_result(out)
        else:
            found = await asyncio.shield(self._out)
            if found is None:
                return False
            out = found
            if frag.kv.dtype != out.dtype or [*frag.kv.shape[:3], frag.kv.size(4)] != [*out.shape[:3], out.size(4)]:
                log.warning(
                    "fragment layout changes at group %d (%s %s -> %s %s); prefix ends there",
                    number,
                    out.dtype,
                    [*out.shape[:3], self._size, out.size(4)],
                    frag.kv.dtype,
                    list(frag.kv.shape),
                )
                return False
        await asyncio.to_thread(self._copy, out, number, frag.kv)
        return True

    def _copy(self, out: torch.Tensor, number: int, kv: torch.Tensor) -> None:
        target = out[:, :, :, number * self._size : (number + 1) * self._size]
        if out.device.type == "cuda":  # not run in CI (no GPU); README says where it was checked
            target.copy_(kv, non_blocking=True)
            torch.cuda.current_stream(out.device).synchronize()  # the pinned buffer goes back to the pool after this
        else:
            target.copy_(kv)

    def result(self, usable: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(K, V)`` views of the output, cut to the first ``usable`` groups."""
        out = self._out.result()
        assert out is not None
        if usable < self._groups:
            out = out[:, :, :, : usable * self._size].contiguous()
        return [(out[layer, 0].unsqueeze(0), out[layer, 1].unsqueeze(0)) for layer in range(out.size(0))]


class AsyncVUA:
    """The async core. Every verb is a coroutine; use one object from one event loop."""

    def __init__(
        self,
        config: VUAConfig | type[VUAConfig],
        location: Location,
        *,
        max_inflight: int = 8,
        strict: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """``location``: ``s3://bucket/prefix?settings``, ``file:///path``, a path, or a store.

        ``max_inflight`` bounds the fragments being encoded or decoded at once, and with
        them the memory held in transit.

        A cache is an optimization, so by default an outage of the store (unreachable,
        5xx after retries, slower than ``timeout`` seconds per query) makes
        ``get_closest``/``lookup`` a miss, with one warning per outage. ``strict=True``
        raises :class:`~vua_s3.errors.StoreUnavailableError` instead. Configuration
        errors (access denied, missing bucket, bad settings) always raise.
        """
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight <= 0:
            raise ValueError(f"max_inflight must be a positive integer, got {max_inflight!r}")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf")
        ):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self._config = VUAConfig.coerce(config)
        self._store = open_store(location)
        self._max_inflight = max_inflight
        self._strict = strict
        self._timeout = timeout
        self._outage: str | None = None
        self._limits: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._known = _KnownPresent()
        self._pool = _BufferPool(keep=max_inflight)

    def config(self) -> VUAConfig:
        """The configuration this cache was opened with."""
        return self._config

    @property
    def store(self) -> Store:
        return self._store

    def _limit(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        limit = self._limits.get(loop)
        if limit is None:
            limit = self._limits[loop] = asyncio.Semaphore(self._max_inflight)
        return limit

    async def _probe(self, keys: Sequence[str], *, trust_known: bool = True) -> list[ObjectInfo | None]:
        """One wave of HEADs for the keys not known to be present (all of them unless
        ``trust_known``); hits are remembered."""
        infos = [self._known.get(key) if trust_known else None for key in keys]
        unknown = [i for i, info in enumerate(infos) if info is None]
        if unknown:
            found = await self._store.head_many([keys[i] for i in unknown])
            for i, info in zip(unknown, found, strict=True):
                infos[i] = info
                if info is not None:
                    self._known.add(info)
        return infos

    def _groups(self, ids: torch.Tensor, salt: str | None) -> list[_Group]:
        if salt is not None and not isinstance(salt, str):
            raise TypeError(f"salt must be a string or None, got {type(salt).__name__}")
        cfg = self._config
        digests = group_digests(ids, cfg.split_factor, cfg.namespace, salt)
        return [
            _Group(fragment_key(cfg.namespace, d), d, digests[i - 1] if i else None, i) for i, d in enumerate(digests)
        ]

    async def put(self, tokens: torch.Tensor, kvcache: KVCache, *, salt: str | None = None) -> int:
        """Store every group of ``tokens`` not already stored; return how many were written.

        ``tokens`` is ``[n]``, ``[1, n]`` or ``[b, n]`` (a batch, one sequence per row);
        ``kvcache`` is one ``(K, V)`` per layer, each ``[b, heads, n, head_dim]``; ``n``
        must be a multiple of ``split_factor``. A failed upload raises
        :class:`~vua_s3.errors.StoreError`; groups already written stay valid.
        """
        rows = _token_rows(tokens)
        _check_kvcache(kvcache, rows)
        sequences = [(row, token_ids(tokens_row, self._config.split_factor)) for row, tokens_row in enumerate(rows)]
        todo: dict[str, tuple[int, torch.Tensor, _Group]] = {}
        for row, ids in sequences:
            for group in self._groups(ids, salt):
                todo.setdefault(group.key, (row, ids, group))
        present = await self._probe(list(todo))
        missing = [item for item, info in zip(todo.values(), present, strict=True) if info is None]
        await gather_or_cancel(*(self._write_group(kvcache, row, 0, ids, group) for row, ids, group in missing))
        return len(missing)

    async def put_groups(
        self, ids: torch.Tensor, kvcache: KVCache, groups: Sequence[int], *, kv_start: int = 0, salt: str | None = None
    ) -> None:
        """Write groups ``groups`` of the token sequence ``ids`` (validated by
        :func:`~vua_s3.keys.token_ids`) whose KV is ``kvcache`` row 0, holding tokens from
        ``kv_start`` on; concurrently, without probing first. The writer that integrations
        with their own bookkeeping (the vLLM connector) share with :meth:`put`."""
        chain = self._groups(ids, salt)
        await gather_or_cancel(*(self._write_group(kvcache, 0, kv_start, ids, chain[number]) for number in groups))

    async def _write_group(self, kvcache: KVCache, row: int, kv_start: int, ids: torch.Tensor, group: _Group) -> None:
        """The one group writer: the fragment goes out as views of the caller's tensors."""
        size = self._config.split_factor
        start = group.number * size
        metadata = fragment.group_metadata(self._config.namespace, size, group.number, group.digest, group.parent)
        async with self._limit():
            segments = await asyncio.to_thread(
                fragment.encode_segments, kvcache, row, start - kv_start, ids[start : start + size], metadata
            )
            await self._store.put_segments(group.key, segments)
        self._known.add(ObjectInfo(key=group.key, size=sum(map(len, segments)), last_modified=time.time()))

    @overload
    async def get_closest(
        self, tokens: torch.Tensor, device: Any = ..., *, salt: str | None = ...
    ) -> ClosestKV | None: ...
    @overload
    async def get_closest(
        self, tokens: Sequence[torch.Tensor], device: Any = ..., *, salt: str | None = ...
    ) -> list[ClosestKV | None]: ...
    async def get_closest(
        self, tokens: torch.Tensor | Sequence[torch.Tensor], device: Any = "cpu", *, salt: str | None = None
    ) -> ClosestKV | list[ClosestKV | None] | None:
        """The longest stored prefix of ``tokens`` loaded onto ``device``, or ``None``.

        A list of 1-D tensors gives a list of results. Tokens are trimmed to the split
        factor first. A fragment that is corrupt, truncated or does not hold the query's
        tokens ends the prefix there (logged), so wrong KV is never returned.
        """
        if isinstance(tokens, torch.Tensor):
            return await self._guarded("get_closest", self._get_one(tokens, torch.device(device), salt), None)
        if not isinstance(tokens, Sequence) or not all(isinstance(t, torch.Tensor) for t in tokens):
            raise TypeError("tokens must be a tensor or a list of tensors")
        return await gather_or_cancel(
            *(self._guarded("get_closest", self._get_one(t, torch.device(device), salt), None) for t in tokens)
        )

    async def _guarded(self, verb: str, work: Awaitable[_T], miss: _T) -> _T:
        """``work`` bounded by the timeout; an outage is ``miss`` (or raises when strict).

        Only :class:`StoreUnavailableError` and the timeout count as an outage; every
        other error (access denied, missing bucket, bad input) propagates.
        """
        try:
            result = await asyncio.wait_for(work, self._timeout)
        except (StoreUnavailableError, asyncio.TimeoutError) as exc:  # distinct classes on Python 3.10
            reason = str(exc) or f"{verb} took longer than timeout={self._timeout}s"
            if self._strict:
                if isinstance(exc, StoreUnavailableError):
                    raise
                raise StoreUnavailableError(f"{verb} on {self._store.url}: {reason}") from None
            if self._outage is None:
                log.warning(
                    "store %s is unavailable, serving cache misses until it answers again: %s", self._store.url, reason
                )
            self._outage = reason
            return miss
        if self._outage is not None:
            log.info("store %s answers again; cache hits resume", self._store.url)
            self._outage = None
        return result

    async def _get_one(self, tokens: torch.Tensor, device: torch.device, salt: str | None) -> ClosestKV | None:
        trimmed = self._trim(tokens)
        if trimmed is None:
            return None
        ids = token_ids(trimmed, self._config.split_factor)
        groups = self._groups(ids, salt)
        hits = _leading_hits(await self._probe([g.key for g in groups]))
        if not hits:
            return None
        assembly = _Assembly(len(hits), self._config.split_factor, device)
        loaded = await gather_or_cancel(
            *(self._load(group, info, ids, assembly) for group, info in zip(groups, hits, strict=False))
        )
        usable = next((i for i, ok in enumerate(loaded) if not ok), len(loaded))
        if not usable:
            return None
        data = await asyncio.to_thread(assembly.result, usable)
        return ClosestKV(tokens=trimmed[: usable * self._config.split_factor].to(device), data=data)

    async def _load(self, group: _Group, info: ObjectInfo, ids: torch.Tensor, assembly: _Assembly) -> bool:
        """Fetch, check and place one fragment; ``False`` (logged) if it cannot be used."""
        placed = False
        async with self._limit():
            fetched = await self._fetch(group.key, info.size, assembly.pinned)
            try:
                if fetched is None:
                    return False
                frag = await self._decode(group, ids, fetched[1])
                if frag is None:
                    return False
                placed = await assembly.place(group.number, frag)
                return placed
            finally:
                if group.number == 0 and not placed:
                    assembly.abandon()
                if fetched is not None:
                    self._pool.give(fetched[0], assembly.pinned)

    async def _fetch(self, key: str, size: int, pinned: bool) -> tuple[torch.Tensor, memoryview] | None:
        """The object in a pooled buffer, or ``None`` (logged) if it is gone. If its size is
        not the probe's (a remembered probe, rewritten since), it is probed once more."""
        for attempt in range(2):
            buf = self._pool.take(size, pinned)
            view = buf.numpy().data[:size]
            try:
                await self._store.get_into(key, view)
                return buf, view
            except BaseException as exc:
                self._pool.give(buf, pinned)
                if not isinstance(exc, (ObjectNotFoundError, SizeMismatchError)):
                    raise
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

    def _trim(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The query as 1-D tokens trimmed to whole groups; ``None`` if shorter than one group."""
        if tokens.numel() == 0:
            raise ValueError("tokens is empty: there is nothing to look up")
        trimmed = self._config.trim_to_split_factor(tokens)
        return trimmed if trimmed.numel() else None

    async def lookup(self, tokens: torch.Tensor, *, salt: str | None = None) -> int:
        """How many leading tokens of ``tokens`` are stored, by probing only (no data moves).

        Like :meth:`get_closest`, an outage of the store gives 0 unless ``strict``.
        """
        return await self._guarded("lookup", self._lookup(tokens, salt), 0)

    async def _lookup(self, tokens: torch.Tensor, salt: str | None) -> int:
        return len(await self._stored_sizes(tokens, salt, 0)) * self._config.split_factor

    async def stored_sizes(self, tokens: torch.Tensor, *, salt: str | None = None, first_group: int = 0) -> list[int]:
        """The sizes of the stored groups of ``tokens`` from ``first_group`` on, up to the
        first missing one: a lookup that skips the groups the caller holds itself and
        tells :meth:`load_groups` what to fetch without probing again."""
        return await self._guarded("lookup", self._stored_sizes(tokens, salt, first_group), [])

    async def _stored_sizes(self, tokens: torch.Tensor, salt: str | None, first_group: int) -> list[int]:
        trimmed = self._trim(tokens)
        if trimmed is None:
            return []
        groups = self._groups(token_ids(trimmed, self._config.split_factor), salt)[first_group:]
        # Always asked: a lookup tells what the store can serve now (an outage, a refusal, an
        # expiry must show), where put and get_closest lose nothing by trusting the cache.
        infos = await self._probe([g.key for g in groups], trust_known=False)
        return [info.size for info in _leading_hits(infos)]

    async def load_groups(
        self,
        tokens: torch.Tensor,
        first_group: int,
        place: Callable[[int, torch.Tensor], bool],
        *,
        sizes: Sequence[int] | None = None,
        salt: str | None = None,
        pinned: bool = False,
    ) -> int:
        """Fetch the stored groups of ``tokens`` from ``first_group`` on and hand each to
        ``place(number, kv)`` as it arrives, instead of assembling the whole prefix.

        ``kv`` is the fragment's ``[layers, 2, heads, split_factor, head_dim]`` in a pooled
        (``pinned``: page-locked) host buffer, valid only during the call, which runs in a
        worker thread and returns whether the group was used. ``sizes`` (from
        :meth:`stored_sizes`) saves the probe. Returns how many leading groups from
        ``first_group`` were fetched, checked and placed; every call to ``place`` has
        returned by then, also on error, timeout or cancellation.
        """
        work = self._load_groups(tokens, first_group, place, sizes, salt, pinned)
        return await self._guarded("load_groups", work, 0)

    async def _load_groups(
        self,
        tokens: torch.Tensor,
        first_group: int,
        place: Callable[[int, torch.Tensor], bool],
        sizes: Sequence[int] | None,
        salt: str | None,
        pinned: bool,
    ) -> int:
        trimmed = self._trim(tokens)
        if trimmed is None:
            return 0
        ids = token_ids(trimmed, self._config.split_factor)
        groups = self._groups(ids, salt)[first_group:]
        if sizes is None:
            sizes = [info.size for info in _leading_hits(await self._probe([g.key for g in groups]))]
        # Every group settles: one failure does not cancel the others (groups placed
        # after an earlier one failed are simply not counted).
        loads = (self._load_into(g, size, ids, place, pinned) for g, size in zip(groups, sizes, strict=False))
        usable = 0
        for result in await asyncio.gather(*loads, return_exceptions=True):
            if isinstance(result, BaseException):
                if not usable:
                    raise result
                break
            if not result:
                break
            usable += 1
        return usable

    async def _load_into(
        self, group: _Group, size: int, ids: torch.Tensor, place: Callable[[int, torch.Tensor], bool], pinned: bool
    ) -> bool:
        async with self._limit():
            fetched = await self._fetch(group.key, size, pinned)
            if fetched is None:
                return False
            try:
                frag = await self._decode(group, ids, fetched[1])
                return frag is not None and await _in_thread(place, group.number, frag.kv)
            finally:
                self._pool.give(fetched[0], pinned)

    async def _decode(self, group: _Group, ids: torch.Tensor, data: memoryview) -> fragment.Fragment | None:
        """The fetched fragment, or ``None`` (logged) unless it is exactly ``group``."""
        try:
            frag = await _in_thread(fragment.decode, data)
            size = self._config.split_factor
            group_tokens = ids[group.number * size : (group.number + 1) * size]
            fragment.check_group(frag, self._config.namespace, size, group.number, group.digest, group_tokens)
        except FragmentError as exc:
            log.warning("fragment %s in %s is unusable, treated as a miss: %s", group.key, self._store.url, exc)
            return None
        return frag

    async def close(self) -> None:
        """Release the store's connections."""
        await self._store.close()

    async def __aenter__(self) -> AsyncVUA:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class VUA:
    """The sync face of :class:`AsyncVUA`: same verbs, callable from any thread.

    The work runs on a private event loop thread, so it is safe from several
    threads and from code that is itself running an event loop.
    """

    def __init__(self, config: VUAConfig | type[VUAConfig], location: Location, **options: Any) -> None:
        self._async = AsyncVUA(config, location, **options)
        self._loop = BackgroundLoop()

    def config(self) -> VUAConfig:
        """The configuration this cache was opened with."""
        return self._async.config()

    @property
    def store(self) -> Store:
        return self._async.store

    def put(self, tokens: torch.Tensor, kvcache: KVCache, *, salt: str | None = None) -> int:
        """See :meth:`AsyncVUA.put`."""
        return self._loop.run(self._async.put(tokens, kvcache, salt=salt))

    @overload
    def get_closest(self, tokens: torch.Tensor, device: Any = ..., *, salt: str | None = ...) -> ClosestKV | None: ...
    @overload
    def get_closest(
        self, tokens: Sequence[torch.Tensor], device: Any = ..., *, salt: str | None = ...
    ) -> list[ClosestKV | None]: ...
    def get_closest(
        self, tokens: torch.Tensor | Sequence[torch.Tensor], device: Any = "cpu", *, salt: str | None = None
    ) -> ClosestKV | list[ClosestKV | None] | None:
        """See :meth:`AsyncVUA.get_closest`."""
        return self._loop.run(self._async.get_closest(tokens, device, salt=salt))

    def lookup(self, tokens: torch.Tensor, *, salt: str | None = None) -> int:
        """See :meth:`AsyncVUA.lookup`."""
        return self._loop.run(self._async.lookup(tokens, salt=salt))

    def close(self) -> None:
        """Release connections and stop the loop thread."""
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> VUA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _token_rows(tokens: torch.Tensor) -> list[torch.Tensor]:
    """The sequences of a ``put``: one per row of a 2-D tensor, or the single 1-D one."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() == 1:
        return [tokens]
    if tokens.dim() == 2:
        return list(tokens.unbind(0))
    raise ValueError(f"tokens must have shape [n] or [batch, n], got {list(tokens.shape)}")


def _check_kvcache(kvcache: KVCache, rows: list[torch.Tensor]) -> None:
    """Raise a clear error unless ``kvcache`` matches the token batch and is storable."""
    if isinstance(kvcache, torch.Tensor) or not isinstance(kvcache, Sequence) or not kvcache:
        raise TypeError("kvcache must be a non-empty list over layers of (K, V) tensor pairs")
    batch, seq_len = len(rows), rows[0].numel()
    first: torch.Tensor | None = None
    for layer, pair in enumerate(kvcache):
        if not isinstance(pair, Sequence) or len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
            raise TypeError(f"kvcache[{layer}] must be a (K, V) pair of tensors")
        for name, t in zip("KV", pair, strict=True):
            if t.dim() != 4:
                raise ValueError(
                    f"kvcache[{layer}] {name} must be [batch, heads, seq_len, head_dim], got {list(t.shape)}"
                )
            if t.size(0) != batch:
                raise ValueError(f"kvcache[{layer}] {name} has batch {t.size(0)} but tokens have {batch} sequence(s)")
            if t.size(2) != seq_len:
                raise ValueError(f"kvcache[{layer}] {name} has seq_len {t.size(2)} but tokens have {seq_len}")
            if first is None:
                first = t
                fragment.dtype_name(t.dtype)
            elif (t.size(1), t.size(3), t.dtype, t.device) != (first.size(1), first.size(3), first.dtype, first.device):
                raise ValueError(
                    f"kvcache[{layer}] {name} is {t.dtype} {list(t.shape)} on {t.device}; every K and V must match "
                    f"layer 0's heads, head_dim, dtype and device ({first.dtype} {list(first.shape)} on {first.device})"
                )


def _leading_hits(infos: Sequence[ObjectInfo | None]) -> list[ObjectInfo]:
    """The probe results up to the first miss: a gap ends the prefix."""
    hits = []
    for info in infos:
        if info is None:
            break
        hits.append(info)
    return hits


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """``asyncio.to_thread``, except that a cancelled caller still waits for the thread
    (which cannot be stopped), so the buffers it uses stay valid until it is done."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise
