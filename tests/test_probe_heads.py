"""The prefix search checks every head a reader needs, with one request per probed group
(S3: one LIST of the group's objects), in no more waves or requests than issue 15 allows."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache

from vua_s3 import AsyncVUA, HeadRange, VUAConfig
from vua_s3.keys import fragment_key, group_digests, token_ids
from vua_s3.probe import worst_case
from vua_s3.shards import rank_heads, rank_writes
from vua_s3.storage import open_store
from vua_s3.storage.s3 import S3Store
from vua_s3.testing.counting import CountingStore

SPLIT = 2
HEADS = 4
CFG = VUAConfig(split_factor=SPLIT, namespace="probe-heads")
GROUPS = 48
RANK1_STOPS = 20  # rank 1 of the TP=2 writer stored groups 0..19 only; rank 0 all 48
STORED = torch.randint(0, 50_000, (GROUPS * SPLIT,), generator=torch.Generator().manual_seed(13))
KV = random_kvcache(layers=1, seq_len=GROUPS * SPLIT, heads=HEADS, head_dim=8)
EVERY = HeadRange.all(HEADS)


def heads_of(
    kv: list[tuple[torch.Tensor, torch.Tensor]], heads: HeadRange, groups: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cut = slice(heads.start, heads.stop)
    return [(k[:, cut, : groups * SPLIT], v[:, cut, : groups * SPLIT]) for k, v in kv]


def query(groups: int, hit: int) -> torch.Tensor:
    """The first ``hit`` groups of ``STORED``, then tokens never stored, ``groups`` in all."""
    fresh = torch.randint(
        50_000, 100_000, ((groups - hit) * SPLIT,), generator=torch.Generator().manual_seed(groups * 100 + hit)
    )
    return torch.cat([STORED[: hit * SPLIT], fresh])


def s3_requests(store: CountingStore) -> int:
    inner = store.inner
    return (
        inner.requests["list_objects_v2"] + inner.requests["head_object"]
        if isinstance(inner, S3Store)
        else store.requests
    )


@pytest.fixture
def location(posix_or_moto: str) -> str:
    return posix_or_moto


@pytest.fixture
def tp_written(location: str) -> Iterator[CountingStore]:
    """``STORED`` written by the two ranks of a TP=2 engine, rank 1's writes from group 20 on lost."""
    store = CountingStore(open_store(location))

    async def fill() -> None:
        vua = AsyncVUA(CFG, store)
        for rank, groups in ((0, GROUPS), (1, RANK1_STOPS)):
            writes = rank_writes(2, rank, HEADS)
            assert writes is not None
            assert await vua.put(STORED[: groups * SPLIT], heads_of(KV, writes, groups), heads=writes) == groups

    asyncio.run(fill())
    yield store
    asyncio.run(store.close())


def test_a_rank_whose_writes_are_missing_ends_the_prefix_there(location: str, tp_written: CountingStore) -> None:
    """Every hit length of prompts of 1..48 groups: a reader of every head, or of rank 1's,
    finds the prefix end at group 20 (or before); rank 0's reader finds all its groups.
    Requests (LISTs and HEADs, as the S3 store counted them) and waves within issue 15's bounds."""
    store = tp_written
    lengths = range(1, GROUPS + 1) if "://" not in location else (1, 2, 19, 20, 21, 33, GROUPS)

    async def main() -> None:
        vua = AsyncVUA(CFG, store)
        for n in lengths:
            for hit in sorted(
                {0, 1, n // 2, min(n, RANK1_STOPS - 1), min(n, RANK1_STOPS), min(n, RANK1_STOPS + 1), n - 1, n}
            ):
                tokens = query(n, max(hit, 0))
                for heads, expected in (
                    (EVERY, min(hit, RANK1_STOPS)),
                    (rank_heads(2, 1, HEADS), min(hit, RANK1_STOPS)),
                    (rank_heads(2, 0, HEADS), hit),
                ):
                    store.reset()
                    if isinstance(store.inner, S3Store):
                        store.inner.requests.clear()
                    assert await vua.lookup(tokens, heads=heads) == expected * SPLIT, (n, hit, heads)
                    assert store.waves <= 4, (n, hit, heads)
                    assert s3_requests(store) == store.requests <= worst_case(n, 4) <= 2 * math.log2(n) + 4, (n, hit)

    asyncio.run(main())


def test_get_closest_and_put_see_the_missing_rank(tp_written: CountingStore) -> None:
    """get_closest of every head stops at group 20 without fetching past it; a put of every
    head by that object rewrites exactly the groups from 20 on."""

    async def main() -> None:
        vua = AsyncVUA(CFG, tp_written)
        hit = await vua.get_closest(STORED, heads=EVERY)
        assert hit is not None and torch.equal(hit.tokens, STORED[: RANK1_STOPS * SPLIT])
        assert_kv_equal(hit.data, heads_of(KV, EVERY, RANK1_STOPS))
        assert await vua.put(STORED, KV) == GROUPS - RANK1_STOPS
        assert await AsyncVUA(CFG, tp_written).lookup(STORED, heads=EVERY) == GROUPS * SPLIT

    asyncio.run(main())


def test_a_group_missing_a_non_representative_head(location: str) -> None:
    """``put`` stored 8 groups of every head, then head 1 of group 3 went: a lookup of the
    first 4 groups (group 3 is probed: the last) says 3, on any probe budget; the one-wave
    lookup and get_closest say 3 of all 8; a fresh object's put of the 4 rewrites group 3,
    and a put of all 8 by an object that saw the hole rewrites it too."""
    tokens = STORED[: 8 * SPLIT]
    digest = group_digests(token_ids(tokens, SPLIT), SPLIT, CFG.namespace, None)[3]

    async def main() -> None:
        store = CountingStore(open_store(location))
        writer = AsyncVUA(CFG, store)
        assert await writer.put(tokens, heads_of(KV, EVERY, 8)) == 8
        for attempt in range(2):
            await store.delete(fragment_key(CFG.namespace, digest, 1))
            for waves in (1, 2, 4):
                fresh = AsyncVUA(CFG, store, probe_waves=waves)
                assert await fresh.lookup(tokens[: 4 * SPLIT], heads=EVERY) == 3 * SPLIT, waves
            assert await AsyncVUA(CFG, store, probe_waves=1).lookup(tokens, heads=EVERY) == 3 * SPLIT
            seen = AsyncVUA(CFG, store)
            hit = await seen.get_closest(tokens)
            assert hit is not None and hit.tokens.numel() == 3 * SPLIT
            if attempt == 0:
                assert await AsyncVUA(CFG, store).put(tokens[: 4 * SPLIT], heads_of(KV, EVERY, 4)) == 1
            else:
                assert await seen.lookup(tokens) in (3 * SPLIT, 8 * SPLIT)  # a hole: may overstate
                assert await seen.put(tokens, heads_of(KV, EVERY, 8)) == 1
            full = await AsyncVUA(CFG, store).get_closest(tokens)
            assert full is not None and torch.equal(full.tokens, tokens)
            assert_kv_equal(full.data, heads_of(KV, EVERY, 8))
        await store.close()

    asyncio.run(main())
