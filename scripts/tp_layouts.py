"""Requests and bytes per loaded group by tensor-parallel size, for the layouts format 2 chose from.

Part 1 computes, for a model shape (default Llama-3-8B: 32 layers, 8 KV heads, head_dim
128, bf16) and split factor, what one group costs a reader engine of TP 1/2/4/8 under
each candidate layout. Part 2 measures the chosen layout (one object per group and KV
head) with the real code: ``vua-s3 bench-tp`` (``vua_s3.bench.tp``) for that model.

    python scripts/tp_layouts.py [--model llama3-8b] [--split-factor 256] [--groups 2]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vua_s3.bench.tp import TpBenchOptions, format_tp_report, run_tp_bench
from vua_s3.shapes import PRESETS, ModelShape

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--split-factor", type=int, default=256)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--writers", default="1,2,8", help="writer TP sizes to measure, comma-separated")
    args = parser.parse_args()
    print_computed(PRESETS[args.model], args.split_factor)
    writers = tuple(int(w) for w in args.writers.split(","))
    options = TpBenchOptions(models=(args.model,), writers=writers, split_factor=args.split_factor, groups=args.groups)
    print(f"## Measured: the chosen layout, real code (vua-s3 bench-tp)\n\n{format_tp_report(run_tp_bench(options))}")


if __name__ == "__main__":
    main()
