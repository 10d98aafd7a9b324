"""The VUA API on every backend: the original VUA scenarios, exact round trips, batches."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache, run_in_threads

from vua_s3 import VUA, AsyncVUA, ClosestKV, VUAConfig

CFG = VUAConfig(split_factor=16)


def prefix_kv(
    kv: list[tuple[torch.Tensor, torch.Tensor]], n: int, row: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k[row : row + 1, :, :n], v[row : row + 1, :, :n]) for k, v in kv]


def test_seed_scenarios(location: str) -> None:
    """The original VUA test: half, quarter, quarter + other tokens, batched get and put."""
    nr_tokens = 200
    tokens = torch.randint(0, 0xFFFF, (1, nr_tokens), dtype=torch.int32)
    trimmed = CFG.trim_to_split_factor(tokens)
    half = CFG.trim_to_split_factor(tokens[:, : nr_tokens // 2])
    quarter = CFG.trim_to_split_factor(tokens[:, : nr_tokens // 4])
    other = CFG.trim_to_split_factor(torch.cat([tokens[:, : nr_tokens // 4], tokens[:, 3 * nr_tokens // 4 :]], dim=1))
    kv = random_kvcache(layers=3, seq_len=half.numel())
    with VUA(CFG, location) as vua:
        assert vua.put(half, kv) == half.numel() // 16

        res = vua.get_closest(trimmed, device="cpu")
        assert isinstance(res, ClosestKV)
        assert torch.equal(res.tokens, half)
        assert_kv_equal(res.data, kv)

        res = vua.get_closest(quarter, device="cpu")
        assert res is not None and torch.equal(res.tokens, quarter)
        assert_kv_equal(res.data, prefix_kv(kv, quarter.numel()))

        res = vua.get_closest(other, device="cpu")
        assert res is not None and torch.equal(res.tokens, quarter)

        both = vua.get_closest([quarter, other], device="cpu")
        assert isinstance(both, list) and len(both) == 2
        assert both[0] is not None and both[1] is not None
        assert torch.equal(both[0].tokens, quarter) and torch.equal(both[1].tokens, quarter)

        batch = torch.randint(0, 0xFFFF, (3, 16 * 4))
        batch_kv = random_kvcache(layers=2, seq_len=batch.size(1), batch=3, heads=4)
        assert vua.put(batch, batch_kv) == 12
        for row in range(3):
            res = vua.get_closest(batch[row], device="cpu")
            assert res is not None and torch.equal(res.tokens, batch[row])
            assert_kv_equal(res.data, prefix_kv(batch_kv, batch.size(1), row))


def test_seed_api_spelling(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Code written for the original README runs with only the import changed."""
    vua = VUA(VUAConfig, str(tmp_path / "vua_cache"))
    tokens = torch.randint(0, 0xFFFF, (1, 512), dtype=torch.uint16)
    trimmed = VUAConfig.trim_to_split_factor(tokens)
    assert trimmed.shape == (512,)
    assert len(VUAConfig.tokens_to_paths(trimmed)) == 512 // VUAConfig.split_factor == 2
    kvcache = [[torch.randn(1, 2, trimmed.size(0), 64), torch.randn(1, 2, trimmed.size(0), 64)]]
    vua.put(trimmed, kvcache)
    result = vua.get_closest(trimmed, device="cpu")
    assert result is not None
    assert result.tokens.dtype == torch.uint16 and torch.equal(result.tokens, trimmed)
    assert torch.equal(result.data[0][0], kvcache[0][0]) and torch.equal(result.data[0][1], kvcache[0][1])
    assert vua.config().split_factor == 256
    vua.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bit_exact_round_trip(location: str, dtype: torch.dtype) -> None:
    tokens = torch.randint(0, 128_000, (64,))
    kv = random_kvcache(layers=2, seq_len=64, heads=2, head_dim=16, dtype=dtype)
    # Special values must survive too.
    kv[0][0][0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")]).to(dtype)
    with VUA(CFG, location) as vua:
        vua.put(tokens, kv)
        res = vua.get_closest(tokens, device="cpu")
    assert res is not None
    assert_kv_equal(res.data, kv)


def test_put_skips_groups_already_stored(location: str) -> None:
    tokens = torch.randint(0, 1000, (64,))
    kv = random_kvcache(seq_len=64)
    with VUA(CFG, location) as vua:
        assert vua.put(tokens[:32], prefix_kv(kv, 32)) == 2
        assert vua.put(tokens, kv) == 2  # only the two new groups
        assert vua.put(tokens, kv) == 0
        assert vua.lookup(tokens) == 64


def test_lookup_counts_leading_groups_only(location: str) -> None:
    tokens = torch.randint(0, 1000, (80,))
    with VUA(CFG, location) as vua:
        assert vua.lookup(tokens) == 0
        vua.put(tokens[:48], random_kvcache(seq_len=48))
        assert vua.lookup(tokens) == 48
        assert vua.lookup(tokens[:40]) == 32  # trimmed to whole groups
        assert vua.lookup(tokens[:10]) == 0  # shorter than one group
        changed = tokens.clone()
        changed[20] += 1  # differs inside group 1: the chain diverges there
        assert vua.lookup(changed) == 16


def test_namespaces_and_salts_are_isolated(location: str) -> None:
    tokens = torch.randint(0, 1000, (32,))
    with VUA(VUAConfig(split_factor=16, namespace="model-a"), location) as a:
        a.put(tokens, random_kvcache(seq_len=32), salt="tenant-1")
        assert a.lookup(tokens, salt="tenant-1") == 32
        assert a.lookup(tokens, salt="tenant-2") == 0
        assert a.lookup(tokens) == 0
    with VUA(VUAConfig(split_factor=16, namespace="model-b"), location) as b:
        assert b.lookup(tokens, salt="tenant-1") == 0
        assert b.get_closest(tokens, salt="tenant-1") is None


def test_async_api_from_many_tasks(location: str) -> None:
    prompts = [torch.randint(0, 1000, (48,)) for _ in range(6)]
    caches = [random_kvcache(seq_len=48) for _ in prompts]

    async def scenario() -> None:
        async with AsyncVUA(CFG, location) as vua:
            await asyncio.gather(*(vua.put(t, kv) for t, kv in zip(prompts, caches, strict=True)))
            results = await asyncio.gather(*(vua.get_closest(t) for t in prompts))
            for res, t, kv in zip(results, prompts, caches, strict=True):
                assert res is not None and torch.equal(res.tokens, t)
                assert_kv_equal(res.data, kv)

    asyncio.run(scenario())


def test_sync_face_from_many_threads_and_inside_a_running_loop(location: str) -> None:
    prompts = [torch.randint(0, 1000, (32,)) for _ in range(4)]
    caches = [random_kvcache(seq_len=32) for _ in prompts]
    with VUA(CFG, location) as vua:

        def worker(i: int) -> None:
            vua.put(prompts[i], caches[i])
            res = vua.get_closest(prompts[i])
            assert res is not None
            assert_kv_equal(res.data, caches[i])

        run_in_threads(worker, 4)

        async def inside_loop() -> int:
            return vua.lookup(prompts[0])  # a sync call from code running an event loop

        assert asyncio.run(inside_loop()) == 32


def test_closed_vua_refuses_calls(tmp_path) -> None:  # type: ignore[no-untyped-def]
    vua = VUA(CFG, str(tmp_path))
    vua.close()
    with pytest.raises(RuntimeError, match="closed"):
        vua.lookup(torch.arange(16))
