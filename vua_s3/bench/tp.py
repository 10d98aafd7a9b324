"""``vua-s3 bench-tp``: requests and bytes per loaded group by writer and reader TP size.

Format 2 stores one object per (group, KV head), so engines of any tensor-parallel size
share them. For each model shape and each writer TP size, the ranks of the writer store a
prompt with ``AsyncVUA.put(heads=rank_writes(...))``; then, for each reader TP size, as
the vLLM connector runs it, the scheduler looks the prompt up once for every KV head of
the model, and each rank of the reader (a fresh object, as a fresh process would be)
loads its heads group by group with ``load_group``. A counting wrapper around the store
counts what each step asks: the figures are request and byte counts, exact whatever the
machine's load; every load is compared with what was written.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import DEFAULT_SPLIT_FACTOR, VUAConfig
from ..logsafe import redact_url
from ..shapes import PRESETS, ModelShape
from ..shards import HeadRange, rank_heads, rank_writes
from ..storage import open_store
from ..testing.counting import CountingStore
from ..vua import AsyncVUA

MIB = 1 << 20
KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TpBenchOptions:
    models: tuple[str, ...] = ("llama3-8b", "tiny")
    """Shapes from ``vua_s3.shapes.PRESETS``: 8 KV heads and 2 KV heads by default."""
    writers: tuple[int, ...] = (1, 2, 4, 8)
    readers: tuple[int, ...] = (1, 2, 4, 8)
    split_factor: int = DEFAULT_SPLIT_FACTOR
    groups: int = 2
    url: str | None = None
    """Where to store (any location); default a temporary directory. The bench deletes what it wrote."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in PRESETS]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}: choose from {', '.join(sorted(PRESETS))}")


def _heads_of(kv: KV, heads: HeadRange) -> KV:
    return [(k[:, heads.start : heads.stop], v[:, heads.start : heads.stop]) for k, v in kv]


def _equal(out: torch.Tensor, kv: KV, heads: HeadRange, start: int) -> bool:
    end = start + out.size(3)
    return all(
        torch.equal(out[layer, i], pair[i][0, heads.start : heads.stop, start:end])
        for layer, pair in enumerate(kv)
        for i in range(2)
    )


async def _one_writer(
    store: CountingStore, shape: ModelShape, writer: int, options: TpBenchOptions, namespace: str
) -> list[dict[str, Any]]:
    """Every reader TP size against what a TP=``writer`` engine stored."""
    split, groups = options.split_factor, options.groups
    config = VUAConfig(split_factor=split, namespace=namespace)
    tokens = torch.arange(groups * split) + 1000
    kv = shape.random_kvcache(groups * split)
    store.reset()
    for rank in range(writer):
        writes = rank_writes(writer, rank, shape.kv_heads)
        if writes is not None:
            await AsyncVUA(config, store).put(tokens, _heads_of(kv, writes), heads=writes)
    puts, written = store.puts, store.bytes_out
    rows = []
    for reader in options.readers:
        store.reset()
        every = HeadRange.all(shape.kv_heads)
        before = _store_requests(store)
        found = await AsyncVUA(config, store).lookup(tokens, heads=every)
        lookup = {"requests": store.requests, "lists": store.lists, "waves": store.waves}
        after = _store_requests(store)
        sent = None if before is None or after is None else dict(after - before)
        store.reset()
        exact = found == tokens.numel()
        for rank in range(reader):
            heads = rank_heads(reader, rank, shape.kv_heads)
            worker = AsyncVUA(config, store)
            for number in range(groups):
                out = torch.empty(shape.layers, 2, heads.count, split, shape.head_dim, dtype=shape.dtype)
                exact = await worker.load_group(tokens, number, heads, out) and exact
                exact = _equal(out, kv, heads, number * split) and exact
        rows.append(
            {
                "model": shape.name,
                "kv_heads": shape.kv_heads,
                "writer_tp": writer,
                "reader_tp": reader,
                "puts_per_group": puts / groups,
                "mib_written_per_group": written / groups / MIB,
                "lookup_requests": lookup["requests"],
                "lookup_lists": lookup["lists"],
                "lookup_heads": lookup["requests"] - lookup["lists"],
                "lookup_waves": lookup["waves"],
                "lookup_store_requests": sent,
                "gets_per_group": store.gets / groups,
                "mib_read_per_group": store.bytes_in / groups / MIB,
                "mib_read_per_rank": store.bytes_in / groups / reader / MIB,
                "exact": exact,
            }
        )
    return rows


@contextlib.contextmanager
def _location(options: TpBenchOptions) -> Iterator[tuple[str, str]]:
    """(where to store, its description)."""
    if options.url:
        yield options.url, redact_url(options.url).split("?")[0]
        return
    with tempfile.TemporaryDirectory(prefix="vua-bench-tp-") as root:
        yield root, "POSIX (a temporary directory)"


def run_tp_bench(options: TpBenchOptions) -> dict[str, Any]:
    from .report import context

    rows: list[dict[str, Any]] = []
    with _location(options) as (location, description):

        async def main() -> None:
            store = CountingStore(open_store(location))
            run = f"bench-tp-{uuid.uuid4().hex[:8]}"
            try:
                for name in options.models:
                    shape = PRESETS[name]
                    for writer in _usable(options.writers, shape):
                        rows.extend(await _one_writer(store, shape, writer, options, f"{run}-{name}-w{writer}"))
            finally:
                stale = [info.key async for info in store.list(run)]
                await asyncio.gather(*(store.delete(key) for key in stale))
                await store.close()

        asyncio.run(main())
    return {
        **context(description),
        "split_factor": options.split_factor,
        "groups": options.groups,
        "rows": rows,
    }


def _store_requests(store: CountingStore) -> Counter[str] | None:
    """What the store itself counted (an S3 store counts its requests by operation), else ``None``."""
    sent = getattr(store.inner, "requests", None)
    return Counter(sent) if isinstance(sent, Counter) else None


def _usable(sizes: Sequence[int], shape: ModelShape) -> list[int]:
    """The TP sizes an engine of ``shape`` can run: they divide its KV heads or are a multiple."""
    return [t for t in sizes if shape.kv_heads % t == 0 or t % shape.kv_heads == 0]


def format_tp_report(result: dict[str, Any]) -> str:
    lines = [
        f"store: {result['store']}; {result['machine']}; {result['when']}; "
        f"load average {' '.join(f'{x:.2f}' for x in result['load_average'])}",
        f"{result['groups']} groups of {result['split_factor']} tokens; the scheduler's lookup asks for every "
        "KV head; per-group figures are over all ranks of the engine; LIST: an S3 store lists a group's "
        "objects in one request, HEAD: a group of one object",
        "",
        "| model | KV heads | writer TP | reader TP | PUTs per group | lookup: LISTs + HEADs | waves | "
        "GETs per group | MiB read per group | MiB per rank | exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['kv_heads']} | {r['writer_tp']} | {r['reader_tp']} | {r['puts_per_group']:g} | "
            f"{r['lookup_lists']} + {r['lookup_heads']} | {r['lookup_waves']} | {r['gets_per_group']:g} | "
            f"{r['mib_read_per_group']:.2f} | {r['mib_read_per_rank']:.2f} | {'yes' if r['exact'] else 'NO'} |"
        )
    return "\n".join(lines)
