"""Shard arithmetic: which KV heads a tensor-parallel rank holds, writes and reads."""

from __future__ import annotations

import pytest

from vua_s3 import HeadRange
from vua_s3.keys import Group
from vua_s3.shards import rank_heads, rank_writes

SIZES = (1, 2, 4, 8)
GROUP = Group("ns", 16, 0, b"\x01" * 32, None)


@pytest.mark.parametrize("kv_heads", SIZES)
@pytest.mark.parametrize("tp_size", SIZES)
def test_every_head_is_held_by_its_ranks_and_written_once(tp_size: int, kv_heads: int) -> None:
    held = [rank_heads(tp_size, rank, kv_heads) for rank in range(tp_size)]
    for heads in held:
        assert heads.total == kv_heads
        assert heads.count == max(1, kv_heads // tp_size)
    # vLLM's split: contiguous ranges in rank order; with more ranks than heads, each head
    # sits on tp_size / kv_heads consecutive ranks.
    replicas = max(1, tp_size // kv_heads)
    for rank, heads in enumerate(held):
        assert heads.start == rank // replicas * heads.count
    writers = [w for w in (rank_writes(tp_size, rank, kv_heads) for rank in range(tp_size)) if w is not None]
    written = [head for heads in writers for head in heads.heads]
    assert sorted(written) == list(range(kv_heads))  # every head exactly once, no coordination
    assert len(writers) == min(tp_size, kv_heads)


@pytest.mark.parametrize("kv_heads", SIZES)
@pytest.mark.parametrize("reader", SIZES)
@pytest.mark.parametrize("writer", SIZES)
def test_a_reader_of_any_size_finds_exactly_its_heads(writer: int, reader: int, kv_heads: int) -> None:
    stored = {
        key
        for rank in range(writer)
        if (heads := rank_writes(writer, rank, kv_heads)) is not None
        for key in GROUP.keys(heads.heads)
    }
    for rank in range(reader):
        needed = GROUP.keys(rank_heads(reader, rank, kv_heads).heads)
        assert set(needed) <= stored
        assert len(needed) == max(1, kv_heads // reader)


def test_replicated_heads_examples() -> None:
    # 2 KV heads on 8 ranks: ranks 0-3 hold head 0, ranks 4-7 head 1; ranks 0 and 4 write.
    assert [rank_heads(8, r, 2).start for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [rank_writes(8, r, 2) is not None for r in range(8)] == [True, False, False, False] * 2
    # 8 KV heads on 2 ranks: 0-3 and 4-7; one KV head (MLA-like) on 4 ranks: only rank 0 writes.
    assert rank_heads(2, 1, 8) == HeadRange(4, 8, 8)
    assert [rank_writes(4, r, 1) for r in range(4)] == [HeadRange(0, 1, 1), None, None, None]


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="neither divides nor is a multiple of 8 KV heads"):
        rank_heads(3, 0, 8)
    with pytest.raises(ValueError, match="rank 2 is not a rank of tensor-parallel size 2"):
        rank_heads(2, 2, 8)
    with pytest.raises(ValueError, match="must be positive"):
        rank_writes(0, 0, 8)
    with pytest.raises(TypeError, match="tp_size must be an int"):
        rank_heads(True, 0, 8)
    with pytest.raises(ValueError, match=r"head range \[4, 4\) is not a non-empty range of the model's 8 KV heads"):
        HeadRange(4, 4, 8)
    with pytest.raises(ValueError, match="not a non-empty range"):
        HeadRange(0, 9, 8)
