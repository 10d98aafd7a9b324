"""The cache API: store KV caches by token prefix, find and load the longest stored prefix."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar, overload

import torch

from . import checks, inputs
from .assembly import Assembly, BufferPool
from .config import VUAConfig
from .fragment import Encoder, KVCache
from .group_io import GroupIO
from .keys import Group, Span, token_ids, whole_groups
from .loop import gather_or_cancel
from .outage import Interrupted, OutagePolicy
from .presence import KnownPresent, Prober, leading_hits
from .refresh import Refresher
from .shards import HeadRange, ModelHeads
from .storage import Location, Store, open_store
from .transfer import ObjectIO, settle_prefix

_T = TypeVar("_T")

#: Default bound on one ``get_closest``/``lookup`` query, seconds: past it the query is a miss.
DEFAULT_TIMEOUT = 30.0
#: Default bound on the waves of probes that find the end of a stored prefix (``docs/lookups.md``).
DEFAULT_PROBE_WAVES = 4


class ClosestKV(NamedTuple):
    """The longest stored prefix of a query.

    ``tokens`` is the matched prefix (1-D, the query's dtype); ``data`` is one
    ``(K, V)`` pair per layer, each ``[1, heads, len(tokens), head_dim]``.
    """

    tokens: torch.Tensor
    data: list[tuple[torch.Tensor, torch.Tensor]]


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
        refresh_after: float | None = None,
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

        ``probe_waves`` bounds the waves of concurrent probes (round trips) with which
        ``lookup`` and ``put`` find the end of the stored prefix: more waves, fewer
        requests; 1 probes every group in a single wave (``docs/lookups.md``).

        ``refresh_after`` (seconds, default off) re-stamps in the background the objects a
        load reads once their last write is older than that, so expiry by last write (the
        bucket's lifecycle rule, ``vua-s3 gc``) becomes expiry by last use; keep it well
        under the expiry age (``docs/operations.md``). It costs one server-side copy per object
        at most once per ``refresh_after`` and needs write access to the store.
        """
        checks.positive_int("max_inflight", max_inflight)
        checks.positive_int("probe_waves", probe_waves)
        refresh = checks.optional_seconds("refresh_after", refresh_after)
        self._config = VUAConfig.coerce(config)
        self._store = open_store(location)
        self._policy = OutagePolicy(
            self._store.url, strict=checks.flag("strict", strict), timeout=checks.optional_seconds("timeout", timeout)
        )
        self._known = KnownPresent()
        self._prober = Prober(self._store, self._known, probe_waves)
        self._refresher = None if refresh is None else Refresher(self._store, refresh, self._known)
        self._io = ObjectIO(self._store, self._known, max_inflight, refresher=self._refresher)
        self._heads = ModelHeads()  # of this namespace, once a put or a load told
        self._groups = GroupIO(self._config, self._prober, self._io, self._heads, self._policy)

    def config(self) -> VUAConfig:
        """The configuration this cache was opened with."""
        return self._config

    @property
    def store(self) -> Store:
        return self._store

    @property
    def max_inflight(self) -> int:
        """The bound on fragments in transit at once."""
        return self._io.max_inflight

    @property
    def buffers(self) -> BufferPool:
        """The receive buffers reused across loads (their counters show reuse)."""
        return self._io.pool

    @property
    def refresher(self) -> Refresher | None:
        """What re-stamps the objects loads read (its counters), when ``refresh_after`` is set."""
        return self._refresher

    @property
    def probe_requests(self) -> int:
        """Groups this object's probes asked the store about so far, one request each (what
        lookups cost; groups it knew stored are not asked)."""
        return self._prober.requests

    def forget_known(self) -> None:
        """Forget what this object has seen stored, so the next query asks the store as a
        new process would (the bench measures that way)."""
        self._known.clear()

    async def _quietly(self, work: Awaitable[_T]) -> _T:
        """``work``, with this object's refreshes held back meanwhile: they start once no verb
        runs (``refresh.py``), so they never compete with a query for the loop."""
        if self._refresher is None:
            return await work
        with self._refresher.busy():
            return await work

    def _chain(self, tokens: torch.Tensor, salt: str | None) -> tuple[torch.Tensor, torch.Tensor, list[Group]] | None:
        """The query trimmed to whole groups, its ids and its groups; ``None`` if shorter than one group."""
        trimmed = whole_groups(tokens, self._config.split_factor)
        if trimmed is None:
            return None
        ids = token_ids(trimmed, self._config.split_factor)
        return trimmed, ids, self._config.chain(ids, inputs.salt(salt))

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
        return await self._quietly(self._put(tokens, kvcache, salt, heads))

    async def _put(self, tokens: torch.Tensor, kvcache: KVCache, salt: str | None, heads: HeadRange | None) -> int:
        rows = inputs.token_rows(tokens)
        inputs.kvcache(kvcache, rows)
        held = inputs.held_heads(kvcache, heads)
        self._heads.learn(held.total)
        probed = [held.representative, *held.rest]
        sequences = [token_ids(row, self._config.split_factor) for row in rows]
        chains = [self._config.chain(ids, inputs.salt(salt)) for ids in sequences]
        missing = await gather_or_cancel(*(self._prober.missing(chain, probed) for chain in chains))
        todo: dict[str, tuple[int, torch.Tensor, Group]] = {}
        for row, (ids, chain, numbers) in enumerate(zip(sequences, chains, missing, strict=True)):
            for number in numbers:
                todo.setdefault(chain[number].key(held.representative), (row, ids, chain[number]))
        encoders = {row: Encoder(kvcache, row, first_head=held.start) for row, _, _ in todo.values()}
        await gather_or_cancel(*(self._io.write_group(encoders[row], 0, ids, g, held) for row, ids, g in todo.values()))
        return len(todo)

    @overload
    async def get_closest(
        self,
        tokens: torch.Tensor,
        device: Any = ...,
        *,
        salt: str | None = ...,
        heads: HeadRange | None = ...,
        pinned: bool | None = ...,
    ) -> ClosestKV | None: ...
    @overload
    async def get_closest(
        self,
        tokens: Sequence[torch.Tensor],
        device: Any = ...,
        *,
        salt: str | None = ...,
        heads: HeadRange | None = ...,
        pinned: bool | None = ...,
    ) -> list[ClosestKV | None]: ...
    async def get_closest(
        self,
        tokens: torch.Tensor | Sequence[torch.Tensor],
        device: Any = "cpu",
        *,
        salt: str | None = None,
        heads: HeadRange | None = None,
        pinned: bool | None = None,
    ) -> ClosestKV | list[ClosestKV | None] | None:
        """The longest stored prefix of ``tokens`` loaded onto ``device``, or ``None``.

        A list of 1-D tensors gives a list of results. Tokens are trimmed to the split
        factor first. ``heads`` loads only those KV heads (default: all). A group is
        part of the prefix only if every head asked for is there and checks out; an
        object that is missing, corrupt, truncated, unreadable or does not hold the query's
        tokens ends the prefix there (logged), so wrong KV is never returned.

        ``pinned`` stages objects in page-locked memory (default: when ``device`` is CUDA,
        so host-to-device copies run asynchronously); with ``device="cpu"`` it returns
        page-locked tensors a caller can copy on to a GPU without blocking.
        """
        if pinned is not None:
            checks.flag("pinned", pinned)
        place = torch.device(device)
        if isinstance(tokens, torch.Tensor):
            return await self._quietly(
                self._policy.guarded("get_closest", self._get_one(tokens, place, salt, heads, pinned), None)
            )
        if not isinstance(tokens, Sequence) or not all(isinstance(t, torch.Tensor) for t in tokens):
            raise TypeError("tokens must be a tensor or a list of tensors")
        each = (self._policy.guarded("get_closest", self._get_one(t, place, salt, heads, pinned), None) for t in tokens)
        return await self._quietly(gather_or_cancel(*each))

    async def _get_one(
        self, tokens: torch.Tensor, device: torch.device, salt: str | None, heads: HeadRange | None, pinned: bool | None
    ) -> ClosestKV | Interrupted[ClosestKV | None] | None:
        found = self._chain(tokens, salt)
        if found is None:
            return None
        trimmed, ids, groups = found
        hits = leading_hits(await self._prober.wave(groups, self._heads.probed(inputs.heads(heads))))
        if not hits:
            return None
        # Every head: fetched at once if this object knows how many, else after the first
        # group's representative tells (and remembered; a wrong guess is a miss once).
        assembly = Assembly(len(hits), self._config.split_factor, device, self._heads.resolve(heads), pinned=pinned)
        usable, outage = await settle_prefix(
            [self._io.load_group(g, g.number, info.size, ids, assembly) for g, info in zip(groups, hits, strict=False)]
        )
        if heads is None:
            self._heads.learn(assembly.kv_heads)
        result = None
        if usable:
            data = await asyncio.to_thread(assembly.result, usable)
            result = ClosestKV(tokens=trimmed[: usable * self._config.split_factor].to(device), data=data)
        return result if outage is None else Interrupted(result, outage)

    async def lookup(self, tokens: torch.Tensor, *, salt: str | None = None, heads: HeadRange | None = None) -> int:
        """How many leading tokens of ``tokens`` are stored, by probing only (no data moves).

        A group counts only if every head of ``heads`` is stored, checked with one request
        per probed group (S3: one listing of the group's objects), so a head another
        tensor-parallel rank failed to write ends the prefix there. With ``heads=None``:
        every head of the model once this object has learned how many (from a put or a
        load), else the group's head 0 alone. Like :meth:`get_closest`, an outage of the
        store gives 0 unless ``strict``.
        """
        return await self._quietly(self._policy.guarded("lookup", self._lookup(tokens, salt, heads), 0))

    async def _lookup(self, tokens: torch.Tensor, salt: str | None, heads: HeadRange | None) -> int:
        found = self._chain(tokens, salt)
        if found is None:
            return 0
        # Always asked: a lookup tells what the store can serve now (an outage, a refusal, an
        # expiry must show), where put and get_closest lose nothing by trusting the cache.
        probed = self._heads.probed(inputs.heads(heads))
        stored = await self._prober.stored_prefix(found[2], probed, trust_known=False)
        return stored * self._config.split_factor

    # ------------------------------------------------------------------ group by group (the vLLM connector)

    async def stored_sizes(
        self, tokens: torch.Tensor, *, salt: str | None = None, first_group: int = 0, heads: HeadRange | None = None
    ) -> list[int]:
        """The object sizes of the stored groups of ``tokens`` from ``first_group`` on, up to
        the first missing one: a lookup that skips the groups the caller holds itself and
        tells :meth:`load_groups` what to fetch without probing again."""
        return await self._quietly(self._groups.stored_sizes(tokens, salt, first_group, heads))

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
        return await self._quietly(self._groups.load_group(tokens, number, heads, out, salt))

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
        ``heads``, default all) in a host buffer (``pinned``: page-locked), valid only during
        the call, which runs in a worker thread and returns whether the group was used.
        ``sizes`` (from :meth:`stored_sizes`) saves the probe. Returns how many leading
        groups from ``first_group`` were fetched, checked and placed; every call to
        ``place`` has returned by then, also on error, timeout or cancellation.
        """
        return await self._quietly(self._groups.load_groups(tokens, first_group, place, sizes, salt, pinned, heads))

    async def load_span(
        self,
        span: Span,
        ids: torch.Tensor,
        place: Callable[[int, torch.Tensor], bool],
        *,
        sizes: Sequence[int] | None = None,
        pinned: bool = False,
        heads: HeadRange | None = None,
        held: Sequence[bytes] = (),
    ) -> int:
        """:meth:`load_groups` for a caller that chained the sequence itself: the groups of
        ``span`` (:class:`~vua_s3.keys.Span`), whose tokens are ``ids``, and nothing before
        them is hashed or sent. ``held`` are the digests of the groups before the span that
        the caller holds itself (they count as used, for ``refresh_after``)."""
        return await self._quietly(self._groups.load_span(span, ids, place, sizes, pinned, heads, held))

    async def put_span(
        self,
        span: Span,
        ids: torch.Tensor,
        kvcache: KVCache,
        groups: Sequence[int],
        *,
        kv_start: int = 0,
        heads: HeadRange | None = None,
    ) -> list[int]:
        """:meth:`put_groups` for the groups ``groups`` of ``span``, whose tokens are ``ids``;
        each group's object size, as :meth:`stored_sizes` reports it (what a load of the
        groups needs to skip its probe)."""
        return await self._quietly(self._groups.put_span(span, ids, kvcache, groups, kv_start, heads))

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
        probing first. For a tensor-parallel rank ``heads`` is :func:`vua_s3.shards.rank_writes`."""
        await self._quietly(self._groups.put_groups(ids, kvcache, groups, kv_start, salt, heads))

    async def close(self) -> None:
        """Release the store's connections (refreshes still out are cancelled)."""
        if self._refresher is not None:
            await self._refresher.close()
        await self._store.close()

    async def __aenter__(self) -> AsyncVUA:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
