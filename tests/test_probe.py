"""The prefix search on its own, against a fake store that counts requests and waves."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence

import pytest

from vua_s3.probe import stored_prefix, worst_case


class FakeStore:
    """``head_many`` over a set of present indices; counts waves and keys asked."""

    def __init__(self, present: set[int]) -> None:
        self.present = present
        self.waves: list[list[int]] = []

    async def head_many(self, keys: Sequence[int]) -> list[str | None]:
        self.waves.append(list(keys))
        await asyncio.sleep(0)
        return [f"info-{k}" if k in self.present else None for k in keys]

    @property
    def requests(self) -> int:
        return sum(map(len, self.waves))


def search(n: int, present: set[int], waves: int) -> tuple[int, FakeStore]:
    fake = FakeStore(present)
    return asyncio.run(stored_prefix(list(range(n)), fake.head_many, waves)), fake


@pytest.mark.parametrize("waves", [1, 2, 3, 4, 6])
def test_every_hit_length_is_exact_within_the_wave_budget(waves: int) -> None:
    for n in range(65):
        for hit in range(n + 1):
            length, fake = search(n, set(range(hit)), waves)
            assert length == hit, (n, hit)
            assert len(fake.waves) <= waves
            assert fake.requests <= worst_case(n, waves)
            assert all(fake.waves), "no empty wave is sent"
            asked = [k for wave in fake.waves for k in wave]
            assert len(asked) == len(set(asked)), "no key is asked twice"


def test_one_wave_asks_every_key_at_once() -> None:
    length, fake = search(32, set(range(20)), 1)
    assert length == 20 and fake.waves == [list(range(32))]


@pytest.mark.parametrize("n", [8, 32, 128, 512])
def test_bench_targets_hold_for_the_default_budget(n: int) -> None:
    """<= 2*log2(n)+4 requests and <= 4 round trips for every hit length (issue 15)."""
    for hit in range(n + 1):
        length, fake = search(n, set(range(hit)), 4)
        assert length == hit
        assert fake.requests <= 2 * math.log2(n) + 4, (n, hit, fake.requests)
        assert len(fake.waves) <= 4


@pytest.mark.parametrize("n", [8, 32, 512])
def test_a_miss_and_a_full_hit_take_one_wave(n: int) -> None:
    for hit in (0, n):
        length, fake = search(n, set(range(hit)), 4)
        assert length == hit and len(fake.waves) == 1 and fake.requests <= 6


def test_the_worst_case_is_reached() -> None:
    """``worst_case`` is the bound the bench and docs/lookups.md quote: exact, not loose."""
    for n in (1, 2, 5, 8, 32, 100):
        for waves in (1, 2, 3, 4):
            most = max(search(n, set(range(hit)), waves)[1].requests for hit in range(n + 1))
            assert most == worst_case(n, waves), (n, waves)


def test_more_waves_never_cost_more_requests() -> None:
    for n in (8, 32, 128, 512):
        costs = [worst_case(n, waves) for waves in range(1, 7)]
        assert costs == sorted(costs, reverse=True), (n, costs)
        assert costs[0] == n
        assert worst_case(n, 1000) == worst_case(n, 12)


def test_a_hole_may_overstate_but_the_answer_is_a_probed_boundary() -> None:
    """With keys missing inside the stored run, the answer is never shorter than the true
    leading run, and it is where a probed present key meets a probed missing one."""
    rnd = random.Random(15)
    for _ in range(3000):
        n = rnd.randint(1, 80)
        density = rnd.random()
        present = {i for i in range(n) if rnd.random() < density}
        leading = next((i for i in range(n) if i not in present), n)
        for waves in (1, 2, 4):
            length, fake = search(n, present, waves)
            asked = {k for wave in fake.waves for k in wave}
            assert len(fake.waves) <= waves and fake.requests <= worst_case(n, waves)
            assert length >= leading
            assert length == n or (length in asked and length not in present)
            assert length == 0 or length - 1 in present
            if waves == 1:
                assert length == leading


def test_keys_may_be_anything_the_caller_probes() -> None:
    """One representative per group (e.g. one rank's key for all ranks): the search only
    hands the caller's keys back to its ``head_many``."""
    keys = [("rank0", i) for i in range(10)]
    seen: list[tuple[str, int]] = []

    async def head_many(batch: Sequence[tuple[str, int]]) -> list[int | None]:
        seen.extend(batch)
        return [1 if key[1] < 7 else None for key in batch]

    prefix = asyncio.run(stored_prefix(keys, head_many, 4))
    assert prefix == 7 and set(seen) <= set(keys)


def test_an_error_mid_search_propagates() -> None:
    calls = 0

    async def head_many(batch: Sequence[int]) -> list[int | None]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("store went away")
        return [1 if k < 20 else None for k in batch]

    with pytest.raises(ConnectionError):
        asyncio.run(stored_prefix(list(range(64)), head_many, 4))
    assert calls == 2


@pytest.mark.parametrize("waves", [0, -1, True, 2.0, "4"])
def test_a_bad_wave_budget_is_refused(waves: object) -> None:
    with pytest.raises(ValueError, match="waves"):
        asyncio.run(stored_prefix([1, 2], FakeStore(set()).head_many, waves))  # type: ignore[arg-type]


def test_a_short_answer_from_head_many_is_an_error() -> None:
    async def head_many(batch: Sequence[int]) -> list[int | None]:
        return [1]

    with pytest.raises(ValueError):
        asyncio.run(stored_prefix(list(range(16)), head_many, 4))
