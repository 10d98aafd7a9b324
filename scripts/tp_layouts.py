"""Requests and bytes per loaded group by tensor-parallel size, for the layouts format 2 chose from.

Part 1 computes, for a model shape (default Llama-3-8B: 32 layers, 8 KV heads, head_dim
128, bf16) and split factor, what one group costs a reader engine of TP 1/2/4/8 under
each candidate layout. Part 2 measures the chosen layout (one object per group and KV
head) with the real code: writer engines of several TP sizes store a prompt through
``AsyncVUA.put(heads=rank_writes(...))`` into a POSIX directory, then every rank of reader
engines of each TP size looks it up and loads its heads; a counting wrapper around the
store counts HEADs, probe waves, GETs, PUTs and bytes.

    python scripts/tp_layouts.py [--model llama3-8b] [--split-factor 256] [--groups 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vua_s3 import AsyncVUA, VUAConfig
from vua_s3.shapes import PRESETS, ModelShape
from vua_s3.shards import HeadRange, rank_heads, rank_writes
from vua_s3.storage import ObjectInfo, Store
from vua_s3.storage.base import Buffer
from vua_s3.storage.posix import PosixStore

TP_SIZES = (1, 2, 4, 8)
MIB = 1 << 20
S3_MIN_PART = 5 * MIB


@dataclass
class Cost:
    """One reader TP size under one layout, per loaded group."""

    gets_per_rank: float
    mib_per_rank: float
    mib_needed_per_rank: float
    heads_per_lookup: int
    note: str = ""


def computed(shape: ModelShape, split: int) -> dict[str, dict[int, Cost]]:
    """What each candidate layout costs a reader of each TP size, per group."""
    h = shape.kv_heads
    per_head = shape.layers * 2 * split * shape.head_dim * shape.dtype.itemsize / MIB
    table: dict[str, dict[int, Cost]] = {}
    need = {t: max(1, h // t) * per_head for t in TP_SIZES}
    table["v1: one object per (group, writer rank), TP in the namespace"] = {
        t: Cost(1, need[t], need[t], t, "only a writer of the same TP size; others miss") for t in TP_SIZES
    }
    table["one object per (group, KV head)  [chosen]"] = {
        t: Cost(max(1, h // t), need[t], need[t], 1) for t in TP_SIZES
    }
    for shards in (2, 4):
        width = h // shards
        costs = {}
        for t in TP_SIZES:
            if t <= shards:
                costs[t] = Cost(shards // t, need[t], need[t], 1)
            else:  # the rank's heads are part of one shard: read it whole (or 2 ranged requests)
                costs[t] = Cost(1, width * per_head, need[t], 1, f"writers of TP>{shards} must gather a shard")
        table[f"one object per (group, shard), {shards} shards of {width} heads"] = costs
    header_note = "+1 request for the header unless its size is fixed"
    table["one head-major object per group, ranged GETs"] = {
        t: Cost(1, need[t], need[t], 1, f"{header_note}; TP>1 writers must coordinate") for t in TP_SIZES
    }
    return table


def print_computed(shape: ModelShape, split: int) -> None:
    h = shape.kv_heads
    per_head = shape.layers * 2 * split * shape.head_dim * shape.dtype.itemsize / MIB
    print(f"## Computed: {shape.name} ({shape.layers} layers, {h} KV heads, head_dim {shape.head_dim}, "
          f"{str(shape.dtype).removeprefix('torch.')}), split factor {split}: a group is {per_head * h:.0f} MiB, "
          f"{per_head:.0f} MiB per KV head\n")  # fmt: skip
    print("| layout | reader TP | GETs per rank | GETs per group (engine) | MiB read per rank | "
          "over-read | HEADs per group (lookup) | note |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, costs in computed(shape, split).items():
        for t, c in costs.items():
            over = c.mib_per_rank / c.mib_needed_per_rank
            print(f"| {name} | {t} | {c.gets_per_rank:g} | {c.gets_per_rank * t:g} | {c.mib_per_rank:g} | "
                  f"{over:g}x | {c.heads_per_lookup} | {c.note} |")  # fmt: skip
    print()
    print("Writers (per group): per KV head, a TP=t engine sends", h, "PUTs in all for any t, each rank only its",
          "heads, replicated heads by their first rank only; v1 sent t PUTs. A head-major object written by",
          "TP>1 needs one rank to collect the others' parts: an S3 multipart upload with one part per rank has",
          f"{per_head * h / 8:.0f} MiB parts at TP=8, below S3's 5 MiB minimum part size" if per_head * h / 8 * MIB
          < S3_MIN_PART else "one part per rank and a shared upload id", "— or an all-gather on the GPUs.")  # fmt: skip
    print()


class CountingStore(Store):
    """A store that counts what vua_s3 asks of it."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.reset()

    def reset(self) -> None:
        self.heads = self.waves = self.gets = self.puts = 0
        self.bytes_in = self.bytes_out = 0

    async def get(self, key: str, size: int | None = None) -> bytearray:
        self.gets += 1
        data = await self.inner.get(key, size)
        self.bytes_in += len(data)
        return data

    async def get_into(self, key: str, out: memoryview) -> None:
        self.gets += 1
        await self.inner.get_into(key, out)
        self.bytes_in += len(out)

    async def put(self, key: str, data: Buffer) -> None:
        self.puts += 1
        self.bytes_out += len(data)
        await self.inner.put(key, data)

    async def put_segments(self, key: str, segments: Sequence[memoryview]) -> None:
        self.puts += 1
        self.bytes_out += sum(map(len, segments))
        await self.inner.put_segments(key, segments)

    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        self.waves += 1
        self.heads += len(keys)
        return await self.inner.head_many(keys)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    def list(self, prefix: str = ""):  # type: ignore[no-untyped-def]
        return self.inner.list(prefix)


async def measured(shape: ModelShape, split: int, groups: int, writers: Sequence[int]) -> None:
    tokens = torch.arange(groups * split) + 1000
    kv = shape.random_kvcache(groups * split)
    print(f"## Measured: the chosen layout, real code, POSIX store, {groups} groups of {split} tokens\n")
    print("As the vLLM connector will run it: the scheduler looks the prompt up once (all heads), then each")
    print("rank of the reader engine, a fresh process, loads its heads group by group (`load_group`).\n")
    print("| writer TP | reader TP | PUTs per group (writer) | HEADs per group (lookup) | probe waves | "
          "GETs per group (all ranks) | MiB read per group (all ranks) | exact |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for writer in writers:
        with tempfile.TemporaryDirectory(prefix="vua-tp-") as root:
            store = CountingStore(PosixStore(root))
            config = VUAConfig(split_factor=split, namespace=f"tp-layouts-w{writer}")
            for rank in range(writer):
                heads = rank_writes(writer, rank, shape.kv_heads)
                if heads is not None:
                    part = [(k[:, heads.start : heads.stop], v[:, heads.start : heads.stop]) for k, v in kv]
                    await AsyncVUA(config, store).put(tokens, part, heads=heads)
            puts = store.puts
            for reader in TP_SIZES:
                store.reset()
                assert await AsyncVUA(config, store).lookup(tokens) == tokens.numel()
                lookup_heads, waves = store.heads, store.waves
                exact = True
                for rank in range(reader):
                    heads = rank_heads(reader, rank, shape.kv_heads)
                    worker = AsyncVUA(config, store)
                    for number in range(groups):
                        out = torch.empty(shape.layers, 2, heads.count, split, shape.head_dim, dtype=shape.dtype)
                        exact &= await worker.load_group(tokens, number, heads, out)
                        exact &= _equal(out, kv, heads, number * split)
                row = (puts / groups, lookup_heads / groups, waves, store.gets / groups, store.bytes_in / groups / MIB)
                print(f"| {writer} | {reader} | {row[0]:g} | {row[1]:g} | {row[2]} | {row[3]:g} | {row[4]:.2f} | "
                      f"{'yes' if exact else 'NO'} |")  # fmt: skip
    print()


def _equal(out: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], heads: HeadRange, start: int) -> bool:
    end = start + out.size(3)
    return all(
        torch.equal(out[layer, i], pair[i][0, heads.start : heads.stop, start:end])
        for layer, pair in enumerate(kv)
        for i in range(2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--split-factor", type=int, default=256)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--writers", default="1,2,8", help="writer TP sizes to measure, comma-separated")
    args = parser.parse_args()
    shape = PRESETS[args.model]
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print_computed(shape, args.split_factor)
    writers = [int(w) for w in args.writers.split(",")]
    asyncio.run(measured(shape, args.split_factor, args.groups, writers))


if __name__ == "__main__":
    main()
