"""The cache API: store KV caches by token prefix, find and load the longest stored prefix."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Sequence
from typing import Any, NamedTuple, TypeVar, overload

import torch

from . import fragment
from .config import VUAConfig
from .errors import ObjectNotFoundError, StoreUnavailableError
from .fragment import FragmentError, KVCache
from .keys import fragment_key, group_digests, token_ids
from .loop import BackgroundLoop, gather_or_cancel
from .store import ObjectInfo, Store, open_store

log = logging.getLogger(__name__)

Location = str | os.PathLike[str] | Store
KVData = list[tuple[torch.Tensor, torch.Tensor]]
_T = TypeVar("_T")

#: Default bound on one ``get_closest``/``lookup`` query, seconds: past it the query is a miss.
DEFAULT_TIMEOUT = 30.0


class ClosestKV(NamedTuple):
    """The longest stored prefix of a query.

    ``tokens`` is the matched prefix (1-D, the query's dtype); ``data`` is one
    ``(K, V)`` pair per layer, each ``[1, heads, len(tokens), head_dim]``.
    """

    tokens: torch.Tensor
    data: KVData


class _Group(NamedTuple):
    """One group of one sequence: where it lives and what it must contain."""

    key: str
    digest: bytes
    parent: bytes | None
    number: int


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
        present = await self._store.head_many(list(todo))
        missing = [item for item, info in zip(todo.values(), present, strict=True) if info is None]
        await gather_or_cancel(*(self._put_group(kvcache, row, ids, group) for row, ids, group in missing))
        return len(missing)

    async def _put_group(self, kvcache: KVCache, row: int, ids: torch.Tensor, group: _Group) -> None:
        size = self._config.split_factor
        start = group.number * size
        metadata = {
            "namespace": self._config.namespace,
            "split_factor": str(size),
            "group": str(group.number),
            "digest": group.digest.hex(),
            "parent": group.parent.hex() if group.parent else "",
        }
        async with self._limit():
            body = await asyncio.to_thread(fragment.encode, kvcache, row, start, ids[start : start + size], metadata)
            await self._store.put(group.key, body)

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
        infos = await self._store.head_many([g.key for g in groups])
        hits = _leading_hits(infos)
        if not hits:
            return None
        fragments = await gather_or_cancel(
            *(self._load(group, info, ids) for group, info in zip(groups, hits, strict=False))
        )
        usable = _consistent_prefix(fragments)
        if not usable:
            return None
        length = len(usable) * self._config.split_factor
        data = await asyncio.to_thread(_assemble, usable, device)
        return ClosestKV(tokens=trimmed[:length].to(device), data=data)

    async def _load(self, group: _Group, info: ObjectInfo, ids: torch.Tensor) -> fragment.Fragment | None:
        """Fetch and check one fragment; ``None`` (logged) if it cannot be used."""
        async with self._limit():
            try:
                buf = await self._store.get(group.key, info.size)
            except ObjectNotFoundError:
                log.info("fragment %s vanished after the probe (expired or deleted)", group.key)
                return None
            try:
                frag = await asyncio.to_thread(fragment.decode, buf)
                self._check(frag, group, ids)
            except FragmentError as exc:
                log.warning("fragment %s in %s is unusable, treated as a miss: %s", group.key, self._store.url, exc)
                return None
            return frag

    def _check(self, frag: fragment.Fragment, group: _Group, ids: torch.Tensor) -> None:
        """Raise :class:`FragmentError` unless ``frag`` is exactly the group asked for."""
        size = self._config.split_factor
        meta = frag.metadata
        expected = {
            "namespace": self._config.namespace,
            "split_factor": str(size),
            "group": str(group.number),
            "digest": group.digest.hex(),
        }
        for name, value in expected.items():
            if meta.get(name) != value:
                raise FragmentError(f"metadata {name}={meta.get(name)!r}, expected {value!r}")
        if frag.kv.dim() != 5 or frag.kv.size(1) != 2 or frag.kv.size(3) != size:
            raise FragmentError(f"kv tensor has shape {list(frag.kv.shape)}, expected [layers, 2, heads, {size}, dim]")
        start = group.number * size
        if not torch.equal(frag.tokens, ids[start : start + size]):
            raise FragmentError("stored tokens differ from the query's tokens")

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
        trimmed = self._trim(tokens)
        if trimmed is None:
            return 0
        groups = self._groups(token_ids(trimmed, self._config.split_factor), salt)
        infos = await self._store.head_many([g.key for g in groups])
        return len(_leading_hits(infos)) * self._config.split_factor

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


def _consistent_prefix(fragments: Sequence[fragment.Fragment | None]) -> list[fragment.Fragment]:
    """Fragments up to the first unusable one or the first whose layout differs from group 0."""
    usable: list[fragment.Fragment] = []
    for frag in fragments:
        if frag is None:
            break
        if usable and (frag.kv.shape != usable[0].kv.shape or frag.kv.dtype != usable[0].kv.dtype):
            log.warning(
                "fragment layout changes at group %d (%s -> %s); prefix ends there",
                len(usable),
                list(usable[0].kv.shape),
                list(frag.kv.shape),
            )
            break
        usable.append(frag)
    return usable


def _assemble(fragments: Sequence[fragment.Fragment], device: torch.device) -> KVData:
    """Concatenate fragments along the sequence into per-layer ``(K, V)`` on ``device``."""
    layers, _, heads, size, head_dim = fragments[0].kv.shape
    out = torch.empty((layers, 2, heads, size * len(fragments), head_dim), dtype=fragments[0].kv.dtype, device=device)
    for index, frag in enumerate(fragments):
        out[:, :, :, index * size : (index + 1) * size].copy_(frag.kv)
    return [(out[layer, 0].unsqueeze(0), out[layer, 1].unsqueeze(0)) for layer in range(layers)]
