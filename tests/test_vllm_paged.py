"""The vLLM connector's paged-cache copies (:class:`PagedLayer`) on CPU tensors, against a
stand-in for vLLM's CPU cache writer that lays blocks out as its instruction sets do (keys
transposed, pairs packed along a dimension) or in an order no strided view expresses."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from vua_s3.integrations.vllm.paged import CpuCacheWriter, PagedLayer, kernel_block_ids, tile_order

HEADS, BLOCK, HEAD_SIZE, BLOCKS = 2, 16, 8, 12
RUN = BLOCK * HEAD_SIZE
Layout = Callable[[], torch.Tensor]


def keys_transposed() -> torch.Tensor:
    """Token ``t``'s dimension ``d`` at ``d * BLOCK + t`` (vLLM's ``vec``/``vec16`` keys)."""
    return torch.arange(RUN).view(HEAD_SIZE, BLOCK).t().reshape(-1)


def pairs_packed() -> torch.Tensor:
    """Dimensions in pairs, the pairs of every token side by side (a VNNI-style packing)."""
    return torch.arange(RUN).view(HEAD_SIZE // 2, BLOCK, 2).permute(1, 0, 2).reshape(-1)


def shuffled() -> torch.Tensor:
    """An order no strided view reads: the per-element fallback."""
    return torch.randperm(RUN, generator=torch.Generator().manual_seed(5))


def plain() -> torch.Tensor:
    return torch.arange(RUN)


def writer_for(key_at: torch.Tensor, value_at: torch.Tensor) -> CpuCacheWriter:
    """A cache writer storing element ``t * HEAD_SIZE + d`` of a block-head at ``at[...]``."""

    def write(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              slots: torch.Tensor, isa: str) -> None:  # fmt: skip
        for src, cache, at in ((key, key_cache, key_at), (value, value_cache, value_at)):
            for i, slot in enumerate(slots.tolist()):
                block, token = divmod(slot, cache.size(2))
                for head in range(src.size(1)):
                    cache[block, head].view(-1)[at[token * HEAD_SIZE : (token + 1) * HEAD_SIZE]] = src[i, head]

    return write


def write_tokens(writer: CpuCacheWriter, cache: torch.Tensor, blocks: list[int], kv: torch.Tensor) -> None:
    """Store ``kv`` (``[2, heads, tokens, head_size]``) into ``blocks`` the way vLLM does."""
    slots = (torch.tensor(blocks)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
    key_cache, value_cache = cache.view(BLOCKS, HEADS, 2 * BLOCK, HEAD_SIZE).chunk(2, dim=2)
    writer(kv[0].transpose(0, 1), kv[1].transpose(0, 1), key_cache, value_cache, slots, "test")


def tokens(n_blocks: int, seed: int) -> torch.Tensor:
    return torch.randn(2, HEADS, n_blocks * BLOCK, HEAD_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key_layout, value_layout", [
    (keys_transposed, plain), (pairs_packed, keys_transposed), (shuffled, plain), (plain, shuffled),
])  # fmt: skip
def test_cpu_copies_read_and_write_what_the_writer_lays_out(key_layout: Layout, value_layout: Layout) -> None:
    writer = writer_for(key_layout(), value_layout())
    blocks = [7, 2, 9]
    kv = tokens(len(blocks), seed=1)
    written = torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD_SIZE)
    write_tokens(writer, written, blocks, kv)

    layer = PagedLayer("layer.0", written, "CPU_ATTN", HEAD_SIZE, "test", writer)
    index = torch.tensor(blocks)
    key, value = (torch.full((HEADS, len(blocks) * BLOCK, HEAD_SIZE), float("nan")) for _ in range(2))
    layer.gather_into(index, key, value)
    assert torch.equal(key, kv[0]) and torch.equal(value, kv[1])

    scattered = torch.zeros_like(written)
    PagedLayer("layer.0", scattered, "CPU_ATTN", HEAD_SIZE, "test", writer).scatter(index, kv[0], kv[1])
    assert torch.equal(scattered, written)  # byte for byte what vLLM's writer stores, other blocks untouched


def test_tile_order_finds_the_views_of_instruction_set_layouts() -> None:
    for layout in (plain, keys_transposed, pairs_packed):
        at = layout()
        tile = tile_order(at, BLOCK, HEAD_SIZE)
        assert tile is not None, layout.__name__
        stored, reads = tile
        assert torch.equal(torch.arange(RUN).view(stored).permute(reads).reshape(-1), at)
    assert tile_order(shuffled(), BLOCK, HEAD_SIZE) is None


def test_gpu_layout_copies_on_a_strided_cache() -> None:
    """K and V side by side in each row, the blocks dimension not the outermost in memory
    (vLLM's NHD-style physical orders)."""
    physical = torch.zeros(HEADS, BLOCKS, BLOCK, 2 * HEAD_SIZE)
    cache = physical.transpose(0, 1)  # logical [blocks, heads, block_size, 2 * head_size]
    layer = PagedLayer("layer.0", cache, "FLASH_ATTN", HEAD_SIZE, None)
    ratio, block_ids = 2, [1, 4]
    index = kernel_block_ids(block_ids, ratio)
    kv = tokens(len(index), seed=2)
    layer.scatter(index, kv[0], kv[1])
    for j, block in enumerate(index.tolist()):
        span = slice(j * BLOCK, (j + 1) * BLOCK)
        assert torch.equal(cache[block, :, :, :HEAD_SIZE], kv[0][:, span])
        assert torch.equal(cache[block, :, :, HEAD_SIZE:], kv[1][:, span])
    untouched = sorted(set(range(BLOCKS)) - set(index.tolist()))
    assert not cache[untouched].any()
    key, value = (torch.empty(HEADS, len(index) * BLOCK, HEAD_SIZE) for _ in range(2))
    layer.gather_into(index, key, value)
    assert torch.equal(key, kv[0]) and torch.equal(value, kv[1])
