"""The cache API: store KV caches by token prefix, find and load the longest stored prefix."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar, overload

import torch

from . import fragment
from .config import VUAConfig
from .errors import AccessDeniedError, FragmentError, ObjectNotFoundError, SizeMismatchError, StoreUnavailableError
from .fragment import KVCache
from .keys import fragment_key, group_digests, token_ids
from .loop import BackgroundLoop, gather_or_cancel
from .probe import stored_prefix
from .shards import HeadRange
from .storage import ObjectInfo, Store, open_store

log = logging.getLogger(__name__)

Location = str | os.PathLike[str] | Store
_T = TypeVar("_T")

#: Default bound on one ``get_closest``/``lookup`` query, seconds: past it the query is a miss.
DEFAULT_TIMEOUT = 30.0
#: Default bound on the waves of HEADs that find the end of a stored prefix (README, "Lookups").
DEFAULT_PROBE_WAVES = 4


class ClosestKV(NamedTuple):
    """The longest stored prefix of a query.

    ``tokens`` is the matched prefix (1-D, the query's dtype); ``data`` is one
    ``(K, V)`` pair per layer, each ``[1, heads, len(tokens), head_dim]``.
    """

    tokens: torch.Tensor
    data: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class _Interrupted(Generic[_T]):
    """A query cut short by an outage: what it verified before the outage, and the outage."""

    partial: _T
    outage: StoreUnavailableError


class _Group(NamedTuple):
    """One group of one sequence: where it lives and what it must contain."""

    keys: tuple[str, ...]
    """The keys a probe requires of the group, the representative's first (``AsyncVUA._probed``)."""
    digest: bytes
    parent: bytes | None
    number: int

    @property
    def key(self) -> str:
        """The representative's key, which its writer stores after the group's other heads."""
        return self.keys[0]


class _KnownPresent:
    """Keys this object just stored or found, with their sizes: lets a probe skip the HEAD.

    Bounded (least recently used go first) and short-lived: an object can vanish by
    lifecycle expiry or a ``gc`` elsewhere, so a hit is trusted for ``ttl`` seconds at
    most. A stale hit costs little: ``get_closest`` treats a vanished fragment as the
    end of the prefix and forgets it. Keys seen missing are kept too, for ``put`` only:
    it uploads them again even where the chain says they are stored (a hole); a stale
    one costs one needless upload. Probes never take a miss from here.
    """

    def __init__(self, capacity: int = 4096, ttl: float = 30.0) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._entries: OrderedDict[str, tuple[float, ObjectInfo | None]] = OrderedDict()

    def _entry(self, key: str) -> tuple[float, ObjectInfo | None] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if time.monotonic() - entry[0] > self._ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def get(self, key: str) -> ObjectInfo | None:
        entry = self._entry(key)
        return None if entry is None else entry[1]

    def seen_missing(self, key: str) -> bool:
        entry = self._entry(key)
        return entry is not None and entry[1] is None

    def add(self, info: ObjectInfo) -> None:
        self._remember(info.key, info)

    def add_missing(self, key: str) -> None:
        self._remember(key, None)

    def _remember(self, key: str, info: ObjectInfo | None) -> None:
        self._entries[key] = (time.monotonic(), info)
        self._entries.move_to_end(key)
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
    """One query's objects, copied into one output tensor as each arrives.

    The representative head of the first group fixes the layout (and, when the query
    asks for every head without knowing how many there are, the head count) and
    allocates the output; every other object waits for it (their downloads do not) and
    ends the prefix if its layout differs. One copy per object into the output: a
    non-blocking host-to-device copy from pinned memory for CUDA.
    """

    def __init__(
        self,
        groups: int,
        size: int,
        device: torch.device,
        heads: HeadRange | None,
        out: torch.Tensor | None = None,
        *,
        pinned: bool | None = None,
    ) -> None:
        self._groups = groups
        self._size = size
        self._device = device
        self._pinned = device.type == "cuda" if pinned is None else pinned
        self.heads = heads
        """The heads loaded; ``None`` until the first representative tells (every head)."""
        self.kv_heads: int | None = None
        """The model's KV head count, as the first group's representative tells it."""
        self._out: asyncio.Future[torch.Tensor | None] = asyncio.get_running_loop().create_future()
        if out is not None:
            self._out.set_result(out)

    @property
    def pinned(self) -> bool:
        """Receive (and, on the host, output) buffers are page-locked, for async copies to a GPU."""
        return self._pinned

    def output(self) -> torch.Tensor | None:
        """The whole output, ``[layers, 2, heads, tokens, head_dim]``, once placed; else ``None``."""
        return self._out.result() if self._out.done() else None

    @property
    def representative(self) -> int:
        return 0 if self.heads is None else self.heads.representative

    def abandon(self) -> None:
        """The first group's representative is unusable: nothing can be used."""
        if not self._out.done():
            self._out.set_result(None)

    async def layout(self) -> HeadRange | None:
        """The heads loaded, once the layout is fixed; ``None`` if nothing is usable."""
        out = await asyncio.shield(self._out)
        return None if out is None else self.heads

    async def place(self, index: int, frag: fragment.Fragment) -> bool:
        """Copy ``frag`` to group position ``index``; ``False`` (logged) if it does not fit."""
        if not self._out.done() and index == 0 and frag.head == self.representative:
            self.kv_heads = frag.kv_heads
            if self.heads is None:
                self.heads = HeadRange.all(frag.kv_heads)
            layers, two, _, _, head_dim = frag.kv.shape
            shape = (layers, two, self.heads.count, self._size * self._groups, head_dim)
            pin = self._pinned and self._device.type == "cpu"
            empty = functools.partial(torch.empty, shape, dtype=frag.kv.dtype, device=self._device, pin_memory=pin)
            self._out.set_result(await asyncio.to_thread(empty))
        out = await asyncio.shield(self._out)
        if out is None or self.heads is None:
            return False
        if (
            frag.kv.dtype != out.dtype
            or [frag.kv.size(0), frag.kv.size(4)] != [out.size(0), out.size(4)]
            or frag.kv_heads != self.heads.total
            or frag.head not in self.heads.heads
        ):
            log.warning(
                "fragment layout changes at group position %d (%s %d layers, head_dim %d, %s -> %s %s, head %d of %d); "
                "prefix ends there",
                index,
                out.dtype,
                out.size(0),
                out.size(4),
                self.heads,
                frag.kv.dtype,
                list(frag.kv.shape),
                frag.head,
                frag.kv_heads,
            )
            return False
        await _in_thread(self._copy, out, index, frag.head - self.heads.start, frag.kv)
        return True

    def _copy(self, out: torch.Tensor, index: int, head: int, kv: torch.Tensor) -> None:
        target = out[:, :, head : head + 1, index * self._size : (index + 1) * self._size]
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
        probe_waves: int = DEFAULT_PROBE_WAVES,
    ) -> None:
        """``location``: ``s3://bucket/prefix?settings``, ``file:///path``, a path, or a store.

        ``max_inflight`` bounds the fragments being encoded or decoded at once, and with
        them the memory held in transit.

        A cache is an optimization, so by default an outage of the store (unreachable,
        5xx after retries, slower than ``timeout`` seconds per query) makes
        ``get_closest``/``lookup`` a miss, with one warning per outage; an outage part-way
        through a prefix gives the groups loaded before it. ``strict=True`` raises
        :class:`~vua_s3.errors.StoreUnavailableError` instead. Configuration errors (access
        denied, missing bucket, bad settings) always raise.

        ``probe_waves`` bounds the waves of concurrent HEADs (round trips) with which
        ``lookup`` and ``put`` find the end of the stored prefix: more waves, fewer
        requests; 1 is one HEAD per group in a single wave (README, "Lookups").
        """
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight <= 0:
            raise ValueError(f"max_inflight must be a positive integer, got {max_inflight!r}")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf")
        ):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if isinstance(probe_waves, bool) or not isinstance(probe_waves, int) or probe_waves <= 0:
            raise ValueError(f"probe_waves must be a positive integer, got {probe_waves!r}")
        self._config = VUAConfig.coerce(config)
        self._store = open_store(location)
        self._max_inflight = max_inflight
        self._strict = strict
        self._timeout = timeout
        self._probe_waves = probe_waves
        self._outage: str | None = None
        self._limits: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._known = _KnownPresent()
        self._pool = _BufferPool(keep=max_inflight)
        self._kv_heads: int | None = None  # of this namespace, once a put or a load told

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

    def _known_stored(self, group: _Group) -> ObjectInfo | None:
        """The representative's info if this object knows every key of ``group`` present."""
        infos = [self._known.get(key) for key in group.keys]
        return infos[0] if all(info is not None for info in infos) else None

    async def _probe(self, groups: Sequence[_Group], *, trust_known: bool = True) -> list[ObjectInfo | None]:
        """One wave, one request per group not known to be stored (every group unless
        ``trust_known``): a group is stored if all its keys are, and answers with its
        representative's info. What the wave finds is remembered key by key."""
        infos = [self._known_stored(group) if trust_known else None for group in groups]
        unknown = [i for i, info in enumerate(infos) if info is None]
        if unknown:
            found = await self._store.head_siblings([groups[i].keys for i in unknown])
            for i, heads in zip(unknown, found, strict=True):
                for key, info in zip(groups[i].keys, heads, strict=True):
                    if info is None:
                        self._known.add_missing(key)
                    else:
                        self._known.add(info)
                infos[i] = heads[0] if all(info is not None for info in heads) else None
        return infos

    async def _stored_prefix(self, groups: Sequence[_Group], *, trust_known: bool) -> int:
        """How many leading ``groups`` are stored, found in at most ``probe_waves`` waves."""

        async def head_many(batch: Sequence[_Group]) -> list[ObjectInfo | None]:
            return await self._probe(batch, trust_known=trust_known)

        return await stored_prefix(groups, head_many, self._probe_waves)

    async def _missing(self, groups: Sequence[_Group]) -> list[int]:
        """The groups ``put`` must upload: those from the end of the stored prefix on, and
        any before it this object saw missing a head (a hole is filled, not trusted to the chain)."""
        missing: list[int] = []
        start = 0
        seen_missing = [any(self._known.seen_missing(key) for key in group.keys) for group in groups]
        while True:
            hole = next((i for i in range(start, len(groups)) if seen_missing[i]), len(groups))
            # A group known to be stored vouches for those before it, as the search's probes do.
            known = (i + 1 for i in range(start, hole) if self._known_stored(groups[i]) is not None)
            lo = max(known, default=start)
            end = lo + await self._stored_prefix(groups[lo:hole], trust_known=True)
            if end < hole or hole == len(groups):
                return missing + list(range(end, len(groups)))
            missing.append(hole)
            start = hole + 1

    def _probed(self, heads: HeadRange | None) -> list[int]:
        """The heads a probe requires of each group, the representative first: those asked
        for; for every head (``None``), the model's once this object knows how many from a
        put or a load, else the representative alone (the loads then verify the others)."""
        if heads is None:
            if self._kv_heads is None:
                return [0]
            heads = HeadRange.all(self._kv_heads)
        return [heads.representative, *heads.rest]

    def _groups(self, ids: torch.Tensor, salt: str | None, heads: HeadRange | None = None) -> list[_Group]:
        if salt is not None and not isinstance(salt, str):
            raise TypeError(f"salt must be a string or None, got {type(salt).__name__}")
        if heads is not None and not isinstance(heads, HeadRange):
            raise TypeError(f"heads must be a vua_s3.HeadRange or None, got {type(heads).__name__}")
        cfg = self._config
        digests = group_digests(ids, cfg.split_factor, cfg.namespace, salt)
        probed = self._probed(heads)
        return [
            _Group(tuple(fragment_key(cfg.namespace, d, h) for h in probed), d, digests[i - 1] if i else None, i)
            for i, d in enumerate(digests)
        ]

    async def put(
        self, tokens: torch.Tensor, kvcache: KVCache, *, salt: str | None = None, heads: HeadRange | None = None
    ) -> int:
        """Store every group of ``tokens`` not already stored; return how many were written.

        ``tokens`` is ``[n]``, ``[1, n]`` or ``[b, n]`` (a batch, one sequence per row);
        ``kvcache`` is one ``(K, V)`` per layer, each ``[b, heads, seq_len, head_dim]`` with
        ``seq_len >= n``: its first ``n`` positions are stored (as the original VUA did with
        trimmed tokens); ``n`` must be a multiple of ``split_factor``. ``heads`` says which of
        the model's KV heads ``kvcache`` holds (default: all); each head is one object. A
        failed upload raises :class:`~vua_s3.errors.StoreError`; groups already written stay
        valid.
        """
        rows = _token_rows(tokens)
        _check_kvcache(kvcache, rows)
        heads = self._held_heads(kvcache, heads)
        sequences = [token_ids(tokens_row, self._config.split_factor) for tokens_row in rows]
        chains = [self._groups(ids, salt, heads) for ids in sequences]
        missing = await gather_or_cancel(*(self._missing(chain) for chain in chains))
        todo: dict[str, tuple[int, torch.Tensor, _Group]] = {}
        for row, (ids, chain, numbers) in enumerate(zip(sequences, chains, missing, strict=True)):
            for number in numbers:
                todo.setdefault(chain[number].key, (row, ids, chain[number]))
        encoders = {row: fragment.Encoder(kvcache, row, first_head=heads.start) for row, _, _ in todo.values()}
        await gather_or_cancel(
            *(self._write_group(encoders[row], 0, ids, group, heads) for row, ids, group in todo.values())
        )
        return len(todo)

    async def put_groups(
        self,
        ids: torch.Tensor,
        kvcache: KVCache,
        groups: Sequence[int],
        *,
        kv_start: int = 0,
        salt: str | None = None,
        heads: HeadRange | None = None,
    ) -> None:
        """Write groups ``groups`` of the token sequence ``ids`` (validated by
        :func:`~vua_s3.keys.token_ids`) whose KV is ``kvcache`` row 0, holding tokens from
        ``kv_start`` on and the KV heads ``heads`` (default: all); concurrently, without
        probing first. The writer that integrations with their own bookkeeping (the vLLM
        connector; for a tensor-parallel rank ``heads`` is :func:`vua_s3.shards.rank_writes`)
        share with :meth:`put`."""
        heads = self._held_heads(kvcache, heads)
        chain = self._groups(ids, salt, heads)
        encoder = fragment.Encoder(kvcache, 0, first_head=heads.start)
        await gather_or_cancel(*(self._write_group(encoder, kv_start, ids, chain[number], heads) for number in groups))

    def _held_heads(self, kvcache: KVCache, heads: HeadRange | None) -> HeadRange:
        """The heads ``kvcache`` holds, checked against its shape; remembered as the model's."""
        held = kvcache[0][0].size(1)
        if heads is None:
            heads = HeadRange.all(held)
        elif not isinstance(heads, HeadRange):
            raise TypeError(f"heads must be a vua_s3.HeadRange or None, got {type(heads).__name__}")
        elif heads.count != held:
            raise ValueError(f"kvcache holds {held} KV heads but heads={heads} names {heads.count}")
        self._kv_heads = heads.total
        return heads

    async def _write_group(
        self, encoder: fragment.Encoder, kv_start: int, ids: torch.Tensor, group: _Group, heads: HeadRange
    ) -> None:
        """The one group writer: one object per head, the representative last, so finding
        it means this writer stored the rest."""
        await gather_or_cancel(*(self._write_head(encoder, kv_start, ids, group, heads, h) for h in heads.rest))
        await self._write_head(encoder, kv_start, ids, group, heads, heads.representative)

    async def _write_head(
        self, encoder: fragment.Encoder, kv_start: int, ids: torch.Tensor, group: _Group, heads: HeadRange, head: int
    ) -> None:
        """One object: it goes out as views of the caller's tensors. Host memory is encoded
        on the loop (slicing views and a CRC that releases the GIL: handing each object to a
        thread costs more in GIL hand-offs); device memory is copied out on a thread."""
        size = self._config.split_factor
        start = group.number * size
        metadata = fragment.group_metadata(self._config.namespace, size, group.number, group.digest, group.parent)
        key = fragment_key(self._config.namespace, group.digest, head)
        encode = functools.partial(
            encoder.encode, start - kv_start, ids[start : start + size], metadata, head=head, kv_heads=heads.total
        )
        async with self._limit():
            segments = await asyncio.to_thread(encode) if encoder.needs_host_copy else encode()
            await self._store.put_segments(key, segments)
        self._known.add(ObjectInfo(key=key, size=sum(map(len, segments)), last_modified=time.time()))

    @overload
    async def get_closest(
        self, tokens: torch.Tensor, device: Any = ..., *, salt: str | None = ..., heads: HeadRange | None = ...
    ) -> ClosestKV | None: ...
    @overload
    async def get_closest(
        self,
        tokens: Sequence[torch.Tensor],
        device: Any = ...,
        *,
        salt: str | None = ...,
        heads: HeadRange | None = ...,
    ) -> list[ClosestKV | None]: ...
    async def get_closest(
        self,
        tokens: torch.Tensor | Sequence[torch.Tensor],
        device: Any = "cpu",
        *,
        salt: str | None = None,
        heads: HeadRange | None = None,
    ) -> ClosestKV | list[ClosestKV | None] | None:
        """The longest stored prefix of ``tokens`` loaded onto ``device``, or ``None``.

        A list of 1-D tensors gives a list of results. Tokens are trimmed to the split
        factor first. ``heads`` loads only those KV heads (default: all). A group is
        part of the prefix only if every head asked for is there and checks out; an
        object that is missing, corrupt, truncated, unreadable or does not hold the query's
        tokens ends the prefix there (logged), so wrong KV is never returned.
        """
        if isinstance(tokens, torch.Tensor):
            return await self._guarded("get_closest", self._get_one(tokens, torch.device(device), salt, heads), None)
        if not isinstance(tokens, Sequence) or not all(isinstance(t, torch.Tensor) for t in tokens):
            raise TypeError("tokens must be a tensor or a list of tensors")
        return await gather_or_cancel(
            *(self._guarded("get_closest", self._get_one(t, torch.device(device), salt, heads), None) for t in tokens)
        )

    async def _guarded(self, verb: str, work: Awaitable[_T | _Interrupted[_T]], miss: _T) -> _T:
        """``work`` bounded by the timeout; an outage is ``miss`` (or raises when strict).

        Only :class:`StoreUnavailableError` and the timeout count as an outage; every
        other error (access denied, missing bucket, bad input) propagates. Work cut short
        by an outage gives what it had verified before it, and the outage is reported.
        """
        try:
            result = await asyncio.wait_for(work, self._timeout)
        except (StoreUnavailableError, asyncio.TimeoutError) as exc:  # distinct classes on Python 3.10
            self._outage_began(verb, exc)
            return miss
        if isinstance(result, _Interrupted):
            self._outage_began(verb, result.outage)
            return result.partial
        if self._outage is not None:
            log.info("store %s answers again; cache hits resume", self._store.url)
            self._outage = None
        return result

    def _outage_began(self, verb: str, exc: StoreUnavailableError | asyncio.TimeoutError) -> None:
        """Raise when strict; otherwise warn once per outage."""
        reason = str(exc) or f"{verb} took longer than timeout={self._timeout}s"
        if self._strict:
            if isinstance(exc, StoreUnavailableError):
                raise exc
            raise StoreUnavailableError(f"{verb} on {self._store.url}: {reason}") from None
        if self._outage is None:
            log.warning(
                "store %s is unavailable, serving cache misses until it answers again: %s", self._store.url, reason
            )
        self._outage = reason

    async def _get_one(
        self, tokens: torch.Tensor, device: torch.device, salt: str | None, heads: HeadRange | None
    ) -> ClosestKV | _Interrupted[ClosestKV | None] | None:
        trimmed = self._trim(tokens)
        if trimmed is None:
            return None
        ids = token_ids(trimmed, self._config.split_factor)
        groups = self._groups(ids, salt, heads)
        hits = _leading_hits(await self._probe(groups))
        if not hits:
            return None
        # Every head: fetched at once if this object knows how many, else after the first
        # group's representative tells (and remembered; a wrong guess is a miss once).
        known = HeadRange.all(self._kv_heads) if heads is None and self._kv_heads is not None else heads
        assembly = _Assembly(len(hits), self._config.split_factor, device, known)
        usable, outage = await self._load_prefix(
            [
                self._load(group, group.number, info.size, ids, assembly)
                for group, info in zip(groups, hits, strict=False)
            ]
        )
        if heads is None and assembly.kv_heads is not None:
            self._kv_heads = assembly.kv_heads
        result = None
        if usable:
            data = await asyncio.to_thread(assembly.result, usable)
            result = ClosestKV(tokens=trimmed[: usable * self._config.split_factor].to(device), data=data)
        return result if outage is None else _Interrupted(result, outage)

    async def _load_prefix(self, loads: list[Coroutine[Any, Any, bool]]) -> tuple[int, StoreUnavailableError | None]:
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

    async def _load(self, group: _Group, index: int, size: int, ids: torch.Tensor, assembly: _Assembly) -> bool:
        """Fetch, check and place every head of one group at position ``index``; ``False``
        (logged) if any cannot be used. ``size`` is the representative's (all heads of a
        group have one size). Without a known head count, the rest follow the first
        group's representative, which tells it."""
        first = assembly.representative
        if assembly.heads is not None:
            order = [first, *assembly.heads.rest]
            loaded = await gather_or_cancel(*(self._load_head(group, h, index, size, ids, assembly) for h in order))
            return all(loaded)
        if not await self._load_head(group, first, index, size, ids, assembly):
            return False
        heads = await assembly.layout()
        if heads is None:
            return False
        return all(await gather_or_cancel(*(self._load_head(group, h, index, size, ids, assembly) for h in heads.rest)))

    async def _load_head(
        self, group: _Group, head: int, index: int, size: int, ids: torch.Tensor, assembly: _Assembly
    ) -> bool:
        """Fetch, check and place one object; ``False`` (logged) if it cannot be used."""
        key = fragment_key(self._config.namespace, group.digest, head)
        placed = False
        async with self._limit():
            fetched = await self._fetch(key, size, assembly.pinned)
            try:
                if fetched is None:
                    return False
                try:
                    frag = await _in_thread(fragment.decode, fetched[1])
                    split = self._config.split_factor
                    group_tokens = ids[group.number * split : (group.number + 1) * split]
                    namespace = self._config.namespace
                    fragment.check_group(frag, namespace, split, group.number, group.digest, group_tokens, head)
                except FragmentError as exc:
                    log.warning("fragment %s in %s is unusable, treated as a miss: %s", key, self._store.url, exc)
                    return False
                placed = await assembly.place(index, frag)
                return placed
            finally:
                if index == 0 and head == assembly.representative and not placed:
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

    def _trim(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The query as 1-D tokens trimmed to whole groups; ``None`` if shorter than one group."""
        if tokens.numel() == 0:
            raise ValueError("tokens is empty: there is nothing to look up")
        trimmed = self._config.trim_to_split_factor(tokens)
        return trimmed if trimmed.numel() else None

    async def lookup(self, tokens: torch.Tensor, *, salt: str | None = None, heads: HeadRange | None = None) -> int:
        """How many leading tokens of ``tokens`` are stored, by probing only (no data moves).

        A group counts only if every head of ``heads`` is stored, checked with one request
        per probed group (S3: one listing of the group's objects), so a head another
        tensor-parallel rank failed to write ends the prefix there. With ``heads=None``:
        every head of the model once this object has learned how many (from a put or a
        load), else the group's head 0 alone. Like :meth:`get_closest`, an outage of the
        store gives 0 unless ``strict``.
        """
        return await self._guarded("lookup", self._lookup(tokens, salt, heads), 0)

    async def load_group(
        self, tokens: torch.Tensor, number: int, heads: HeadRange, out: torch.Tensor, *, salt: str | None = None
    ) -> bool:
        """Fetch group ``number`` of ``tokens``, heads ``heads``, into ``out``, without probing.

        ``out`` is ``[layers, 2, heads.count, split_factor, head_dim]`` in the stored dtype,
        on any device (pinned host memory lets a caller copy it on to a GPU
        asynchronously); the object sizes follow from it, so one GET per head and no HEAD.
        Each object is checked and copied in as it arrives. ``False`` (logged) if any head
        is missing or unusable; ``out`` then holds a mix. Outages are handled as in
        :meth:`get_closest`.
        """
        return await self._guarded("load_group", self._load_group(tokens, number, heads, out, salt), False)

    async def _load_group(
        self, tokens: torch.Tensor, number: int, heads: HeadRange, out: torch.Tensor, salt: str | None
    ) -> bool:
        size = self._config.split_factor
        ids = token_ids(tokens, size)
        groups = self._groups(ids, salt, heads)
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < len(groups):
            raise ValueError(f"number must be a group of the {len(groups)} in tokens, got {number!r}")
        if not isinstance(out, torch.Tensor) or out.dim() != 5 or list(out.shape[1:4]) != [2, heads.count, size]:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be [layers, 2, {heads.count}, {size}, head_dim], got {shape}")
        group = groups[number]
        layout = (out.size(0), size, out.size(4), out.dtype)
        metadata = fragment.group_metadata(self._config.namespace, size, group.number, group.digest, group.parent)
        expected = fragment.encoded_size(*layout, metadata, head=heads.representative, kv_heads=heads.total)
        return await self._load(group, 0, expected, ids, _Assembly(1, size, out.device, heads, out))

    async def stored_sizes(
        self, tokens: torch.Tensor, *, salt: str | None = None, first_group: int = 0, heads: HeadRange | None = None
    ) -> list[int]:
        """The object sizes of the stored groups of ``tokens`` from ``first_group`` on, up to
        the first missing one: a lookup that skips the groups the caller holds itself and
        tells :meth:`load_groups` what to fetch without probing again."""
        return await self._guarded("lookup", self._stored_sizes(tokens, salt, first_group, heads), [])

    async def _stored_sizes(
        self, tokens: torch.Tensor, salt: str | None, first_group: int, heads: HeadRange | None
    ) -> list[int]:
        trimmed = self._trim(tokens)
        if trimmed is None:
            return []
        groups = self._groups(token_ids(trimmed, self._config.split_factor), salt, heads)[first_group:]
        # Always asked, as lookup is. The search finds where the stored prefix ends in a few
        # waves; the sizes of the groups before it come from its own probes where it made
        # them (remembered), else from one more wave for the hits only.
        stored = await self._stored_prefix(groups, trust_known=False)
        infos = await self._probe(groups[:stored], trust_known=True)
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
        heads: HeadRange | None = None,
    ) -> int:
        """Fetch the stored groups of ``tokens`` from ``first_group`` on and hand each to
        ``place(number, kv)`` as it arrives, instead of assembling the whole prefix.

        ``kv`` is the group's ``[layers, 2, heads, split_factor, head_dim]`` (every head of
        ``heads``, default all) in a host buffer (``pinned``: page-locked), valid only during the call, which runs in a
        worker thread and returns whether the group was used. ``sizes`` (from
        :meth:`stored_sizes`) saves the probe. Returns how many leading groups from
        ``first_group`` were fetched, checked and placed; every call to ``place`` has
        returned by then, also on error, timeout or cancellation.
        """
        work = self._load_groups(tokens, first_group, place, sizes, salt, pinned, heads)
        return await self._guarded("load_groups", work, 0)

    async def _load_groups(
        self,
        tokens: torch.Tensor,
        first_group: int,
        place: Callable[[int, torch.Tensor], bool],
        sizes: Sequence[int] | None,
        salt: str | None,
        pinned: bool,
        heads: HeadRange | None,
    ) -> int:
        trimmed = self._trim(tokens)
        if trimmed is None:
            return 0
        ids = token_ids(trimmed, self._config.split_factor)
        groups = self._groups(ids, salt, heads)[first_group:]
        if sizes is None:
            sizes = [info.size for info in _leading_hits(await self._probe(groups))]
        # Every group settles: one failure does not cancel the others (groups placed
        # after an earlier one failed are simply not counted).
        known = HeadRange.all(self._kv_heads) if heads is None and self._kv_heads is not None else heads
        loads = (self._load_into(g, size, ids, place, pinned, known) for g, size in zip(groups, sizes, strict=False))
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
        self,
        group: _Group,
        size: int,
        ids: torch.Tensor,
        place: Callable[[int, torch.Tensor], bool],
        pinned: bool,
        heads: HeadRange | None,
    ) -> bool:
        """Every head of ``group`` into one host buffer, then handed to ``place``."""
        staging = _Assembly(1, self._config.split_factor, torch.device("cpu"), heads, pinned=pinned)
        if not await self._load(group, 0, size, ids, staging):
            return False
        if heads is None and staging.kv_heads is not None:
            self._kv_heads = staging.kv_heads
        out = staging.output()
        return out is not None and await _in_thread(place, group.number, out)

    async def _lookup(self, tokens: torch.Tensor, salt: str | None, heads: HeadRange | None) -> int:
        trimmed = self._trim(tokens)
        if trimmed is None:
            return 0
        groups = self._groups(token_ids(trimmed, self._config.split_factor), salt, heads)
        # Always asked: a lookup tells what the store can serve now (an outage, a refusal, an
        # expiry must show), where put and get_closest lose nothing by trusting the cache.
        stored = await self._stored_prefix(groups, trust_known=False)
        return stored * self._config.split_factor

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

    def put(
        self, tokens: torch.Tensor, kvcache: KVCache, *, salt: str | None = None, heads: HeadRange | None = None
    ) -> int:
        """See :meth:`AsyncVUA.put`."""
        return self._loop.run(self._async.put(tokens, kvcache, salt=salt, heads=heads))

    @overload
    def get_closest(
        self, tokens: torch.Tensor, device: Any = ..., *, salt: str | None = ..., heads: HeadRange | None = ...
    ) -> ClosestKV | None: ...
    @overload
    def get_closest(
        self,
        tokens: Sequence[torch.Tensor],
        device: Any = ...,
        *,
        salt: str | None = ...,
        heads: HeadRange | None = ...,
    ) -> list[ClosestKV | None]: ...
    def get_closest(
        self,
        tokens: torch.Tensor | Sequence[torch.Tensor],
        device: Any = "cpu",
        *,
        salt: str | None = None,
        heads: HeadRange | None = None,
    ) -> ClosestKV | list[ClosestKV | None] | None:
        """See :meth:`AsyncVUA.get_closest`."""
        return self._loop.run(self._async.get_closest(tokens, device, salt=salt, heads=heads))

    def lookup(self, tokens: torch.Tensor, *, salt: str | None = None, heads: HeadRange | None = None) -> int:
        """See :meth:`AsyncVUA.lookup`."""
        return self._loop.run(self._async.lookup(tokens, salt=salt, heads=heads))

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
            if t.size(2) < seq_len:  # longer is fine: the first seq_len positions are stored
                raise ValueError(
                    f"kvcache[{layer}] {name} has seq_len {t.size(2)} but tokens have {seq_len}: "
                    "it must cover every token"
                )
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
