"""The prefix search inside AsyncVUA, on real stores: exact lookups, holes, put, outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache, unique_prefix

from vua_s3 import AsyncVUA, StoreUnavailableError, VUAConfig
from vua_s3.probe import worst_case
from vua_s3.storage import open_store
from vua_s3.testing.counting import CountingStore
from vua_s3.testing.faultproxy import Fault, FaultProxy
from vua_s3.testing.moto import EMBEDDED_REGION, EmbeddedS3

SPLIT = 2
CFG = VUAConfig(split_factor=SPLIT, namespace="probe")
GROUPS = 64
STORED = torch.randint(0, 50_000, (GROUPS * SPLIT,), generator=torch.Generator().manual_seed(15))
KV = random_kvcache(layers=1, seq_len=GROUPS * SPLIT, heads=1, head_dim=8)


def fresh(groups: int, seed: int) -> torch.Tensor:
    """Tokens never stored (ids above any stored one)."""
    return torch.randint(50_000, 100_000, (groups * SPLIT,), generator=torch.Generator().manual_seed(seed))


def query(groups: int, hit: int) -> torch.Tensor:
    return torch.cat([STORED[: hit * SPLIT], fresh(groups - hit, groups * 1000 + hit)])


def kv_prefix(groups: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k[:, :, : groups * SPLIT], v[:, :, : groups * SPLIT]) for k, v in KV]


@pytest.fixture
def location(posix_or_moto: str) -> str:
    return posix_or_moto


@pytest.fixture
def stored(location: str) -> Iterator[CountingStore]:
    """A store holding the 64 groups of ``STORED``, counting its probes."""
    store = CountingStore(open_store(location))

    async def fill() -> None:
        assert await AsyncVUA(CFG, store).put(STORED, KV) == GROUPS

    asyncio.run(fill())
    yield store
    asyncio.run(store.close())


def cases(location: str, waves: int) -> list[tuple[int, int]]:
    """Every hit length of every prompt of 1..64 groups on POSIX; on moto (slower), every
    hit length of 64 groups and the edges of the others, fewer for the one-wave probe."""
    if "://" not in location:
        return [(n, hit) for n in range(1, GROUPS + 1) for hit in range(n + 1)]
    lengths = range(1, GROUPS) if waves > 1 else (1, 2, 3, 17, 40)
    edges = [(n, hit) for n in lengths for hit in sorted({0, 1, n // 2, n - 1, n})]
    return edges + [(GROUPS, hit) for hit in range(0, GROUPS + 1, 1 if waves > 1 else 7)]


@pytest.mark.parametrize("waves", [1, 4])
def test_lookup_is_exact_for_every_hit_length(location: str, stored: CountingStore, waves: int) -> None:
    async def main() -> None:
        vua = AsyncVUA(CFG, stored, probe_waves=waves)
        for n, hit in cases(location, waves):
            stored.reset()
            assert await vua.lookup(query(n, hit)) == hit * SPLIT, (n, hit)
            assert stored.requests <= worst_case(n, waves) and stored.waves <= waves, (n, hit)
            if waves == 1:
                assert stored.requests == n

    asyncio.run(main())


def test_lookup_asks_the_store_every_time(stored: CountingStore) -> None:
    async def main() -> None:
        vua = AsyncVUA(CFG, stored)
        for _ in range(2):
            stored.reset()
            assert await vua.lookup(STORED) == GROUPS * SPLIT
            assert stored.waves == 1 and 0 < stored.requests <= 6  # first and last key, and a few between

    asyncio.run(main())


def test_put_uploads_only_the_missing_suffix_with_few_probes(location: str) -> None:
    async def main() -> None:
        store = CountingStore(open_store(location))
        assert await AsyncVUA(CFG, store).put(STORED[: 40 * SPLIT], kv_prefix(40)) == 40
        vua = AsyncVUA(CFG, store)  # a fresh object: nothing known, every answer from the store
        store.reset()
        assert await vua.put(STORED, KV) == GROUPS - 40
        assert store.requests <= worst_case(GROUPS, 4) < GROUPS and store.waves <= 4
        store.reset()
        assert await vua.put(STORED, KV) == 0 and store.requests == 0  # all known to be stored now
        hit = await AsyncVUA(CFG, store).get_closest(STORED)
        assert hit is not None and torch.equal(hit.tokens, STORED)
        assert_kv_equal(hit.data, KV)
        await store.close()

    asyncio.run(main())


def test_put_of_a_batch_uploads_each_missing_group_once(location: str) -> None:
    async def main() -> None:
        store = CountingStore(open_store(location))
        assert await AsyncVUA(CFG, store).put(STORED[: 8 * SPLIT], kv_prefix(8)) == 8
        batch = torch.stack([STORED[: 16 * SPLIT], torch.cat([STORED[: 12 * SPLIT], fresh(4, 1)])])
        kv = random_kvcache(layers=1, seq_len=16 * SPLIT, batch=2, heads=1, head_dim=8)
        # row 0: groups 8..15 missing; row 1: 8..11 shared with row 0, 12..15 its own
        assert await AsyncVUA(CFG, store).put(batch, kv) == 8 + 4
        vua = AsyncVUA(CFG, store, probe_waves=1)
        assert await vua.lookup(batch[0]) == await vua.lookup(batch[1]) == 16 * SPLIT
        await store.close()

    asyncio.run(main())


def test_a_hole_may_make_lookup_overstate_but_get_closest_is_exact(stored: CountingStore) -> None:
    """Group 10 deleted: lookup says 10 groups or all 64 (it may not probe the hole),
    one-wave lookup and get_closest say 10, and a put by the object that saw the hole
    uploads just that group again."""
    keys = CFG.tokens_to_paths(STORED)

    async def main() -> None:
        await stored.delete(keys[10])
        assert await AsyncVUA(CFG, stored).lookup(STORED) in (10 * SPLIT, GROUPS * SPLIT)
        assert await AsyncVUA(CFG, stored, probe_waves=1).lookup(STORED) == 10 * SPLIT
        vua = AsyncVUA(CFG, stored)
        hit = await vua.get_closest(STORED)
        assert hit is not None and torch.equal(hit.tokens, STORED[: 10 * SPLIT])
        assert_kv_equal(hit.data, kv_prefix(10))
        assert await vua.put(STORED, KV) == 1
        hit = await AsyncVUA(CFG, stored).get_closest(STORED)
        assert hit is not None and torch.equal(hit.tokens, STORED)

    asyncio.run(main())


def test_an_expired_first_group_is_a_miss_in_one_wave(stored: CountingStore) -> None:
    """Lifecycle expiry and gc take the oldest groups, which are the first of a chain;
    the first wave always probes group 0."""
    keys = CFG.tokens_to_paths(STORED)

    async def main() -> None:
        for key in keys[:5]:
            await stored.delete(key)
        stored.reset()
        assert await AsyncVUA(CFG, stored).lookup(STORED) == 0
        assert stored.waves == 1
        assert await AsyncVUA(CFG, stored).get_closest(STORED) is None

    asyncio.run(main())


# --- outages mid-search -----------------------------------------------------------------------


class _FailAfterFirstWave(CountingStore):
    """Turns the proxy's HEAD answers into 503 SlowDown once the first wave is back."""

    def __init__(self, location: str, proxy: FaultProxy) -> None:
        super().__init__(open_store(location))
        self.proxy = proxy

    async def head_siblings(self, sets):  # type: ignore[no-untyped-def]
        if self.waves == 1:
            self.proxy.faults = [Fault("status", method="HEAD", status=503, code="SlowDown")]
        return await super().head_siblings(sets)


@pytest.fixture
def via_proxy(moto_server: EmbeddedS3) -> Iterator[tuple[str, FaultProxy]]:
    prefix = unique_prefix()

    async def fill() -> None:
        async with AsyncVUA(CFG, moto_server.url(prefix)) as vua:
            assert await vua.put(STORED[: 20 * SPLIT], kv_prefix(20)) == 20

    asyncio.run(fill())
    with FaultProxy(moto_server.port) as proxy:
        url = (
            f"s3://{moto_server.bucket}/{prefix}?endpoint_url={proxy.endpoint_url}&region={EMBEDDED_REGION}"
            "&addressing=path&max_attempts=1&connect_timeout=1&read_timeout=5"
        )
        yield url, proxy


def test_an_error_mid_search_is_an_outage(via_proxy: tuple[str, FaultProxy], caplog: pytest.LogCaptureFixture) -> None:
    url, proxy = via_proxy

    async def main() -> None:
        store = _FailAfterFirstWave(url, proxy)
        vua = AsyncVUA(CFG, store)
        with caplog.at_level(logging.WARNING, logger="vua_s3"):
            assert await vua.lookup(STORED) == 0
        assert store.waves >= 2
        assert any("unavailable" in r.getMessage() for r in caplog.records)
        proxy.faults = []
        assert await vua.lookup(STORED) == 20 * SPLIT  # it answers again
        await store.close()

        store = _FailAfterFirstWave(url, proxy)
        with pytest.raises(StoreUnavailableError):
            await AsyncVUA(CFG, store, strict=True).lookup(STORED)
        await store.close()

        proxy.faults = []
        store = _FailAfterFirstWave(url, proxy)
        with pytest.raises(StoreUnavailableError):  # writes raise
            await AsyncVUA(CFG, store).put(STORED, KV)
        await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("waves", [0, -2, True, 1.5, "4"])
def test_a_bad_probe_budget_is_refused(tmp_path: object, waves: object) -> None:
    with pytest.raises(ValueError, match="probe_waves"):
        AsyncVUA(CFG, str(tmp_path), probe_waves=waves)  # type: ignore[arg-type]
