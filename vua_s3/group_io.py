"""Group by group: the API integrations with their own bookkeeping use (the vLLM
connector). They know which groups they hold and want, and where each must land, so
nothing here assembles a whole prefix."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import torch

from . import inputs
from .assembly import Assembly
from .config import VUAConfig
from .fragment import Encoder, KVCache
from .keys import Group, Span, token_ids, whole_groups
from .loop import gather_or_cancel, in_thread
from .outage import OutagePolicy
from .presence import Prober, leading_hits
from .shards import HeadRange, ModelHeads
from .transfer import ObjectIO


class GroupIO:
    """Lookups that return object sizes, loads of chosen groups into the caller's memory,
    and writes of chosen groups without probing; outages handled as by the verbs."""

    def __init__(
        self, config: VUAConfig, prober: Prober, io: ObjectIO, heads: ModelHeads, policy: OutagePolicy
    ) -> None:
        self._config = config
        self._prober = prober
        self._io = io
        self._heads = heads
        self._policy = policy

    def _chain(self, tokens: torch.Tensor, salt: str | None) -> tuple[torch.Tensor, list[Group]] | None:
        trimmed = whole_groups(tokens, self._config.split_factor)
        if trimmed is None:
            return None
        ids = token_ids(trimmed, self._config.split_factor)
        return ids, self._config.chain(ids, inputs.salt(salt))

    async def stored_sizes(
        self, tokens: torch.Tensor, salt: str | None, first_group: int, heads: HeadRange | None
    ) -> list[int]:
        return await self._policy.guarded("lookup", self._stored_sizes(tokens, salt, first_group, heads), [])

    async def _stored_sizes(
        self, tokens: torch.Tensor, salt: str | None, first_group: int, heads: HeadRange | None
    ) -> list[int]:
        found = self._chain(tokens, salt)
        if found is None:
            return []
        groups = found[1][first_group:]
        probed = self._heads.probed(inputs.heads(heads))
        # Always asked, as lookup is. The search finds where the stored prefix ends in a few
        # waves; the sizes of the groups before it come from its own probes where it made
        # them (remembered), else from one more wave for the hits only.
        stored = await self._prober.stored_prefix(groups, probed, trust_known=False)
        infos = await self._prober.wave(groups[:stored], probed, trust_known=True)
        return [info.size for info in leading_hits(infos)]

    async def load_group(
        self, tokens: torch.Tensor, number: int, heads: HeadRange, out: torch.Tensor, salt: str | None
    ) -> bool:
        return await self._policy.guarded("load_group", self._load_group(tokens, number, heads, out, salt), False)

    async def _load_group(
        self, tokens: torch.Tensor, number: int, heads: HeadRange, out: torch.Tensor, salt: str | None
    ) -> bool:
        size = self._config.split_factor
        ids = token_ids(tokens, size)
        groups = self._config.chain(ids, inputs.salt(salt))
        inputs.heads(heads)
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < len(groups):
            raise ValueError(f"number must be a group of the {len(groups)} in tokens, got {number!r}")
        if not isinstance(out, torch.Tensor) or out.dim() != 5 or list(out.shape[1:4]) != [2, heads.count, size]:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be [layers, 2, {heads.count}, {size}, head_dim], got {shape}")
        group = groups[number]
        expected = group.encoded_size(out.size(0), out.size(4), out.dtype, heads)
        return await self._io.load_group(group, 0, expected, ids, Assembly(1, size, out.device, heads, out))

    async def load_groups(
        self,
        tokens: torch.Tensor,
        first_group: int,
        place: Callable[[int, torch.Tensor], bool],
        sizes: Sequence[int] | None,
        salt: str | None,
        pinned: bool,
        heads: HeadRange | None,
    ) -> int:
        work = self._load_groups(tokens, first_group, place, sizes, salt, pinned, heads)
        return await self._policy.guarded("load_groups", work, 0)

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
        found = self._chain(tokens, salt)
        if found is None:
            return 0
        ids, chain = found
        return await self._load_chain(ids, chain[first_group:], chain[:first_group], place, sizes, pinned, heads)

    async def load_span(
        self,
        span: Span,
        ids: torch.Tensor,
        place: Callable[[int, torch.Tensor], bool],
        sizes: Sequence[int] | None,
        pinned: bool,
        heads: HeadRange | None,
        held: Sequence[bytes],
    ) -> int:
        work = self._load_span(span, ids, place, sizes, pinned, heads, held)
        return await self._policy.guarded("load_span", work, 0)

    async def _load_span(
        self,
        span: Span,
        ids: torch.Tensor,
        place: Callable[[int, torch.Tensor], bool],
        sizes: Sequence[int] | None,
        pinned: bool,
        heads: HeadRange | None,
        held: Sequence[bytes],
    ) -> int:
        ids = self._span_ids(span, ids)
        groups = self._config.span_groups(span)
        start = self._config.span_groups(Span(0, tuple(held), None))
        return await self._load_chain(ids, groups, start, place, sizes, pinned, heads)

    def _span_ids(self, span: Span, ids: torch.Tensor) -> torch.Tensor:
        ids = token_ids(ids, self._config.split_factor)
        if len(ids) != len(span.digests) * self._config.split_factor:
            raise ValueError(f"a span of {len(span.digests)} groups needs their tokens, got {len(ids)}")
        return ids

    async def _load_chain(
        self,
        ids: torch.Tensor,
        groups: Sequence[Group],
        held_groups: Sequence[Group],
        place: Callable[[int, torch.Tensor], bool],
        sizes: Sequence[int] | None,
        pinned: bool,
        heads: HeadRange | None,
    ) -> int:
        """Load ``groups`` (their tokens in ``ids``); ``held_groups``, the chain's start the
        caller holds itself, only count as used."""
        if sizes is None:
            probed = self._heads.probed(inputs.heads(heads))
            sizes = [info.size for info in leading_hits(await self._prober.wave(groups, probed))]
        # Every group settles: one failure does not cancel the others (groups placed
        # after an earlier one failed are simply not counted).
        known = self._heads.resolve(heads)
        if known is None and groups and sizes:  # the first group's representative tells
            self._heads.learn(await self._io.kv_heads(groups[0], sizes[0], ids, pinned))
            known = self._heads.resolve(heads)
        if known is None:
            return 0
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
        held = self._heads.resolve(heads)
        if usable and held_groups and held is not None:
            self._io.used(held_groups, held.heads)
        return usable

    async def _load_into(
        self,
        group: Group,
        size: int,
        ids: torch.Tensor,
        place: Callable[[int, torch.Tensor], bool],
        pinned: bool,
        heads: HeadRange,
    ) -> bool:
        """Every head of ``group`` into one pooled stage, then handed to ``place``: dense
        when pinned (a GPU's host-to-device copy of a strided view would go through a
        temporary), else a view of the objects as received."""
        async with self._io.staged(group, size, ids, heads, pinned=pinned, dense=pinned) as kv:
            return kv is not None and await in_thread(place, group.number, kv)

    async def put_groups(
        self,
        ids: torch.Tensor,
        kvcache: KVCache,
        groups: Sequence[int],
        kv_start: int,
        salt: str | None,
        heads: HeadRange | None,
    ) -> None:
        chain = self._config.chain(ids, inputs.salt(salt))
        await self._write(ids, kvcache, [chain[number] for number in groups], kv_start, heads)

    async def put_span(
        self,
        span: Span,
        ids: torch.Tensor,
        kvcache: KVCache,
        groups: Sequence[int],
        kv_start: int,
        heads: HeadRange | None,
    ) -> list[int]:
        ids = self._span_ids(span, ids)
        chain = self._config.span_groups(span)
        if any(not span.first <= number < span.stop for number in groups):
            raise ValueError(f"groups {list(groups)} are not all in the span [{span.first}, {span.stop})")
        return await self._write(ids, kvcache, [chain[number - span.first] for number in groups], kv_start, heads)

    async def _write(
        self, ids: torch.Tensor, kvcache: KVCache, groups: Sequence[Group], kv_start: int, heads: HeadRange | None
    ) -> list[int]:
        held = inputs.held_heads(kvcache, heads)
        self._heads.learn(held.total)
        encoder = Encoder(kvcache, 0, first_head=held.start)
        writes = (self._io.write_group(encoder, kv_start, ids, group, held) for group in groups)
        return await gather_or_cancel(*writes)
