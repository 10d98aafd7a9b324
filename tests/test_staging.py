"""Loads into reused memory: the group API's stages come from the pool and are reused
across groups and requests, bounded by max_inflight; fresh outputs are huge-page backed
where the kernel allows, and their mappings live exactly as long as their tensors."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import torch
from conftest import random_kvcache

from vua_s3 import AsyncVUA, HeadRange, VUAConfig, memory
from vua_s3.keys import token_ids
from vua_s3.presence import KnownPresent
from vua_s3.storage import open_store
from vua_s3.transfer import ObjectIO

SPLIT = 16
GROUPS = 6
CFG = VUAConfig(split_factor=SPLIT, namespace="staging")
TOKENS = torch.arange(GROUPS * SPLIT)


def _expected(kv: list[tuple[torch.Tensor, torch.Tensor]], number: int, heads: HeadRange) -> torch.Tensor:
    part = slice(number * SPLIT, (number + 1) * SPLIT)
    return torch.stack(
        [torch.stack([k[0, heads.start : heads.stop, part], v[0, heads.start : heads.stop, part]]) for k, v in kv]
    )


def _placer(seen: dict[int, torch.Tensor]):  # type: ignore[no-untyped-def]
    def place(number: int, data: torch.Tensor) -> bool:
        seen[number] = data.clone()  # valid only during the call
        return True

    return place


@pytest.mark.parametrize("heads", [HeadRange.all(4), HeadRange(1, 3, 4)], ids=["all", "two of four"])
def test_group_loads_reuse_their_stages_across_groups_and_requests(posix_or_moto: str, heads: HeadRange) -> None:
    kv = random_kvcache(layers=3, seq_len=GROUPS * SPLIT, heads=4, head_dim=16, dtype=torch.bfloat16)

    async def run() -> None:
        async with AsyncVUA(CFG, posix_or_moto, max_inflight=2) as vua:
            assert await vua.put(TOKENS, kv) == GROUPS
            sizes = await vua.stored_sizes(TOKENS, heads=heads)
            pool = vua.buffers
            for request in range(3):
                seen: dict[int, torch.Tensor] = {}
                before = (pool.allocated, pool.reused)
                assert await vua.load_groups(TOKENS, 0, _placer(seen), sizes=sizes, heads=heads) == GROUPS
                assert sorted(seen) == list(range(GROUPS))
                for number, data in seen.items():
                    assert torch.equal(data, _expected(kv, number, heads))  # bit-exact, dtype and shape
                allocated, reused = pool.allocated - before[0], pool.reused - before[1]
                # One stage per group, at most 1 + ceil(max_inflight / heads) at once, each from the
                # pool; after the first request no group allocates anything.
                assert allocated + reused == GROUPS
                assert allocated <= (-(-2 // heads.count) + 1 if request == 0 else 0)

    asyncio.run(run())


def test_a_stage_is_a_view_of_the_objects_as_received(posix_or_moto: str) -> None:
    kv = random_kvcache(layers=2, seq_len=2 * SPLIT, heads=2, head_dim=8)
    tokens = TOKENS[: 2 * SPLIT]
    pointers: list[tuple[int, bool, bool]] = []

    def place(number: int, data: torch.Tensor) -> bool:
        base = data.untyped_storage().data_ptr()
        pointers.append((base, data.is_contiguous(), all(data[:, :, h].is_contiguous() for h in range(2))))
        return torch.equal(data, _expected(kv, number, HeadRange.all(2)))

    async def run() -> None:
        async with AsyncVUA(CFG, posix_or_moto, max_inflight=1) as vua:
            await vua.put(tokens, kv)
            for _ in range(2):
                assert await vua.load_groups(tokens, 0, place, heads=HeadRange.all(2)) == 2
            assert vua.buffers.allocated == 2  # two stages at most at once (1 + ceil(1 / 2)), then reused

    asyncio.run(run())
    # Strided over the objects' slots (no copy), each head's KV contiguous; the same memory again.
    assert [(c, h) for _, c, h in pointers] == [(False, True)] * 4
    assert {p for p, _, _ in pointers[2:]} <= {p for p, _, _ in pointers[:2]}


def test_loads_that_do_not_know_the_head_count_learn_it_first(posix_or_moto: str) -> None:
    kv = random_kvcache(layers=2, seq_len=GROUPS * SPLIT, heads=3, head_dim=8)

    async def run() -> None:
        async with AsyncVUA(CFG, posix_or_moto) as writer:
            await writer.put(TOKENS, kv)
        async with AsyncVUA(CFG, posix_or_moto) as reader:  # knows nothing of the model
            seen: dict[int, torch.Tensor] = {}
            assert await reader.load_groups(TOKENS, 2, _placer(seen)) == GROUPS - 2
            for number, data in seen.items():
                assert torch.equal(data, _expected(kv, number, HeadRange.all(3)))

    asyncio.run(run())


def test_dense_stages_are_contiguous_and_pooled(tmp_path: Path) -> None:
    """What a GPU gets (pinned then, which this machine cannot allocate)."""
    kv = random_kvcache(layers=2, seq_len=GROUPS * SPLIT, heads=2, head_dim=8)
    heads = HeadRange.all(2)

    async def run() -> None:
        async with AsyncVUA(CFG, tmp_path) as vua:
            await vua.put(TOKENS, kv)
            sizes = await vua.stored_sizes(TOKENS)
        store = open_store(str(tmp_path))
        io = ObjectIO(store, KnownPresent(), max_inflight=2)
        ids = token_ids(TOKENS, SPLIT)
        for _ in range(2):
            for group, size in zip(CFG.chain(ids, None), sizes, strict=True):
                async with io.staged(group, size, ids, heads, pinned=False, dense=True) as data:
                    assert data is not None and data.is_contiguous()
                    assert torch.equal(data, _expected(kv, group.number, heads))
        # Two receive buffers (max_inflight) and one dense stage, every later take a reuse.
        assert (io.pool.allocated, io.pool.reused) == (3, 2 * GROUPS * 3 - 3)
        await store.close()

    asyncio.run(run())


def test_a_group_with_a_missing_head_is_not_placed(tmp_path: Path) -> None:
    kv = random_kvcache(layers=2, seq_len=GROUPS * SPLIT, heads=2, head_dim=8)

    async def run() -> None:
        async with AsyncVUA(CFG, tmp_path) as vua:
            await vua.put(TOKENS, kv)
            sizes = await vua.stored_sizes(TOKENS)
            victim = CFG.tokens_to_paths(TOKENS, kv_heads=2)[3 * 2 + 1]  # group 3, head 1
            await vua.store.delete(victim)
            seen: dict[int, torch.Tensor] = {}
            assert await vua.load_groups(TOKENS, 0, _placer(seen), sizes=sizes) == 3
            assert set(seen) >= {0, 1, 2} and 3 not in seen

    asyncio.run(run())


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return True
    return False


def _huge_pages_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping holding ``address``."""
    found, huge = False, 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                found = low <= address < high
            elif found and line.startswith("AnonHugePages:"):
                huge = int(line.split()[1])
    return huge


def test_fresh_memory_lives_as_long_as_its_tensors_then_serves_the_next_request() -> None:
    tensor = memory.empty((4, 2, 1 << 20), torch.bfloat16)  # 16 MiB
    address = tensor.data_ptr()
    assert address % memory.HUGE_PAGE == 0 and tensor.is_contiguous() and tensor.dtype == torch.bfloat16
    view = tensor[2, 1]
    del tensor
    gc.collect()
    other = memory.empty((4, 2, 1 << 20), torch.bfloat16)
    second = other.data_ptr()
    assert second != address  # a view keeps the mapping: never handed out twice
    view.fill_(1.5)
    assert float(view.sum()) == 1.5 * (1 << 20)
    del view, other
    gc.collect()
    assert memory.idle_bytes() >= 2 * (16 << 20)
    again = memory.empty_bytes(16 << 20)
    assert again.data_ptr() in (address, second)  # faulted in already: no page faults again
    assert memory.empty_bytes(16 << 20, reuse=False).data_ptr() not in (address, second)
    small = memory.empty((16,), torch.float32)  # below a huge page: plain torch memory
    assert small.numel() == 16


def test_idle_memory_past_the_limit_goes_back_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "IDLE_BYTES", 8 << 20)
    tensor = memory.empty_bytes(16 << 20, reuse=False)
    address = tensor.data_ptr()
    del tensor
    gc.collect()
    assert not _mapped(address)  # over the idle limit: unmapped with the last tensor on it
    assert memory.idle_bytes() <= 8 << 20


def test_fresh_memory_is_huge_page_backed_where_the_kernel_allows() -> None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this kernel")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off")
    tensor = memory.empty_bytes(8 << 20)
    tensor.fill_(7)
    assert _huge_pages_at(tensor.data_ptr()) >= 2048  # at least one 2 MiB page (the kernel may fall back on others)


def test_get_closest_returns_huge_page_backed_memory_that_outlives_the_loads(tmp_path: Path) -> None:
    if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        pytest.skip("transparent huge pages are off")
    kv = random_kvcache(layers=8, seq_len=4 * SPLIT * 16, heads=2, head_dim=128, dtype=torch.float32)  # 16 MiB
    tokens = torch.arange(4 * SPLIT * 16)

    async def run() -> None:
        async with AsyncVUA(CFG, tmp_path) as vua:
            await vua.put(tokens, kv)
            first = await vua.get_closest(tokens)
            second = await vua.get_closest(tokens)  # the same pooled receive buffers again
            assert first is not None and second is not None
            key = first.data[0][0]
            assert _huge_pages_at(key.data_ptr()) >= 2048
            for got in (first, second):
                for (k, v), (wk, wv) in zip(got.data, kv, strict=True):
                    assert torch.equal(k, wk) and torch.equal(v, wv)

    asyncio.run(run())
