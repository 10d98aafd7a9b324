"""Per-group lookups and loads (``AsyncVUA.stored_sizes``, ``load_groups``): what the vLLM
connector uses to fetch only the groups past a local hit, each as it arrives."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from conftest import random_kvcache

from vua_s3 import AsyncVUA, VUAConfig
from vua_s3.keys import Span

SPLIT = 16
CFG = VUAConfig(split_factor=SPLIT, namespace="groups")


def _stored(tmp_path: Path) -> tuple[AsyncVUA, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    vua = AsyncVUA(CFG, tmp_path)
    tokens = torch.arange(4 * SPLIT)
    kv = random_kvcache(seq_len=4 * SPLIT)
    assert asyncio.run(vua.put(tokens, kv)) == 4
    return vua, tokens, kv


def test_stored_sizes_skip_the_groups_the_caller_holds(tmp_path: Path) -> None:
    vua, tokens, _ = _stored(tmp_path)
    sizes = asyncio.run(vua.stored_sizes(tokens, first_group=1))
    assert len(sizes) == 3 and all(size > 0 for size in sizes)
    longer = torch.cat([tokens, torch.arange(SPLIT) + 1000])  # a fifth group, not stored
    assert len(asyncio.run(vua.stored_sizes(longer, first_group=3))) == 1
    assert asyncio.run(vua.lookup(longer)) == 4 * SPLIT


def test_load_groups_hands_over_each_fragment(tmp_path: Path) -> None:
    vua, tokens, kv = _stored(tmp_path)
    placed: dict[int, torch.Tensor] = {}
    threads: set[str] = set()

    def place(number: int, data: torch.Tensor) -> bool:
        threads.add(threading.current_thread().name)
        placed[number] = data.clone()  # valid only during the call
        return True

    sizes = asyncio.run(vua.stored_sizes(tokens, first_group=1))
    assert asyncio.run(vua.load_groups(tokens, 1, place, sizes=sizes)) == 3
    assert sorted(placed) == [1, 2, 3]
    assert threading.main_thread().name not in threads
    for number, data in placed.items():
        for layer, (key, value) in enumerate(kv):
            part = slice(number * SPLIT, (number + 1) * SPLIT)
            assert torch.equal(data[layer, 0], key[0, :, part])
            assert torch.equal(data[layer, 1], value[0, :, part])


def test_load_groups_counts_leading_usable_groups(tmp_path: Path) -> None:
    vua, tokens, _ = _stored(tmp_path)
    (victim,) = [p for p in tmp_path.rglob("*.safetensors") if p.name == CFG.tokens_to_paths(tokens)[2].split("/")[-1]]
    victim.write_bytes(bytes(len(victim.read_bytes())))  # group 2: right size, garbage
    seen: list[int] = []

    def place(number: int, data: torch.Tensor) -> bool:
        seen.append(number)
        return True

    assert asyncio.run(vua.load_groups(tokens, 0, place)) == 2
    assert sorted(seen) == [0, 1, 3]  # group 3 arrived too, and is not counted
    assert asyncio.run(vua.load_groups(tokens, 0, lambda number, data: number != 1)) == 1


def test_spans_write_and_read_groups_without_the_tokens_before_them(tmp_path: Path) -> None:
    """A caller that chained the sequence hands only a span's digests and tokens: what it
    writes is the sequence's own objects (``get_closest`` reads them whole), and it reads
    them back with nothing before the span hashed or fetched."""
    vua = AsyncVUA(CFG, tmp_path)
    tokens = torch.arange(4 * SPLIT) + 7
    kv = random_kvcache(seq_len=4 * SPLIT)
    chain = CFG.chain(tokens)
    head, tail = Span.of(chain, 0, 2), Span.of(chain, 2, 4)
    assert tail.parent == chain[1].digest and tail.stop == 4
    asyncio.run(vua.put_span(head, tokens[: 2 * SPLIT], kv, [0, 1]))
    group_kv = [(k[:, :, 2 * SPLIT :], v[:, :, 2 * SPLIT :]) for k, v in kv]  # the tail's KV only
    asyncio.run(vua.put_span(tail, tokens[2 * SPLIT :], group_kv, [2, 3], kv_start=2 * SPLIT))
    closest = asyncio.run(vua.get_closest(tokens))
    assert closest is not None and len(closest.tokens) == 4 * SPLIT
    for (key, value), (k, v) in zip(kv, closest.data, strict=True):
        assert torch.equal(key, k) and torch.equal(value, v)
    placed: dict[int, torch.Tensor] = {}

    def place(number: int, data: torch.Tensor) -> bool:
        placed[number] = data.clone()
        return True

    held = [g.digest for g in chain[:2]]
    assert asyncio.run(vua.load_span(tail, tokens[2 * SPLIT :], place, held=held)) == 2
    assert sorted(placed) == [2, 3]
    assert torch.equal(placed[3][0, 0], kv[0][0][0, :, 3 * SPLIT :])
    wrong = Span.of(CFG.chain(tokens + 1), 2, 4)  # another sequence's names: nothing matches
    assert asyncio.run(vua.load_span(wrong, tokens[2 * SPLIT :], place)) == 0
    with pytest.raises(ValueError, match="needs their tokens"):
        asyncio.run(vua.load_span(tail, tokens[SPLIT:], place))
