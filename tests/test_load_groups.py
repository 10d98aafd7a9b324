"""Per-group lookups and loads (``AsyncVUA.stored_sizes``, ``load_groups``): what the vLLM
connector uses to fetch only the groups past a local hit, each as it arrives."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import torch
from conftest import random_kvcache

from vua_s3 import AsyncVUA, VUAConfig

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
