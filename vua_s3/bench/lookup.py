"""``vua-s3 bench-lookup``: requests, round trips and latency of a lookup, per probe budget.

Every budget (``probe_waves``; 1 is one wave over every group) answers the same
queries, alternating within each repeat, on one long-lived client: for each prompt
length, one prompt is stored, and each query shares its first ``hit`` groups with it
and continues with tokens never stored. Groups are tiny (one layer, one head, head
dim 8) so that many can be stored cheaply: a probe's cost does not depend on the
fragment size. ``put`` of a prompt whose first half is stored is measured the same
way, by a fresh object (nothing known in advance), as is a cold lookup (a fresh
client per query).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..config import VUAConfig
from ..logsafe import redact_url
from ..storage import Store, open_store
from ..testing.counting import CountingStore
from ..vua import DEFAULT_PROBE_WAVES, AsyncVUA

_KV_SHAPE = (1, 1, 8)  # layers, heads, head_dim
_T = TypeVar("_T")


@dataclass(frozen=True)
class LookupBenchOptions:
    groups: tuple[int, ...] = (8, 32, 128, 512)
    waves: tuple[int, ...] = (1, 2, 3, 4)
    split_factor: int = 16
    repeats: int = 7
    url: str | None = None


@dataclass
class Case:
    """One operation at one prompt length, hit length and probe budget, over the repeats."""

    operation: str
    groups: int
    hit: int
    waves: int
    heads: list[int]
    round_trips: list[int]
    seconds: list[float]
    cpu: list[float]

    def summary(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "groups": self.groups,
            "hit": self.hit,
            "probe_waves": self.waves,
            "heads_max": max(self.heads),
            "round_trips_max": max(self.round_trips),
            "ms_median": 1e3 * statistics.median(self.seconds),
            "ms_min": 1e3 * min(self.seconds),
            "ms_max": 1e3 * max(self.seconds),
            "cpu_ms_median": 1e3 * statistics.median(self.cpu),
        }


@contextlib.contextmanager
def _location(options: LookupBenchOptions) -> Iterator[tuple[Callable[[], Store], str]]:
    """(a way to open the store to measure, its description): the given URL or a local server."""
    if options.url:
        url = options.url
        yield lambda: open_store(url), redact_url(url).split("?")[0]
        return
    from ..testing.local import local_s3

    prefix = f"bench-lookup-{int(time.time())}"
    server, description = local_s3()
    with server:
        yield lambda: server.store(prefix), description


def _tiny_kv(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers, heads, dim = _KV_SHAPE
    return [(torch.randn(1, heads, tokens, dim), torch.randn(1, heads, tokens, dim)) for _ in range(layers)]


class _Bench:
    def __init__(self, open_store: Callable[[], Store], options: LookupBenchOptions) -> None:
        self.options = options
        self.open_store = open_store
        self.store = CountingStore(open_store())
        self.config = VUAConfig(split_factor=options.split_factor, namespace=f"bench-lookup-{uuid.uuid4().hex[:8]}")
        self.cases: list[Case] = []
        self._generator = torch.Generator().manual_seed(15)

    def tokens(self, groups: int) -> torch.Tensor:
        return torch.randint(0, 1 << 30, (groups * self.options.split_factor,), generator=self._generator)

    def case(self, operation: str, groups: int, hit: int, waves: int) -> Case:
        for case in self.cases:
            if (case.operation, case.groups, case.hit, case.waves) == (operation, groups, hit, waves):
                return case
        case = Case(operation, groups, hit, waves, [], [], [], [])
        self.cases.append(case)
        return case

    async def measure(self, case: Case, store: CountingStore, operation: Awaitable[_T]) -> _T:
        store.reset()
        cpu, wall = time.process_time(), time.perf_counter()
        result = await operation
        case.seconds.append(time.perf_counter() - wall)
        case.cpu.append(time.process_time() - cpu)
        case.heads.append(store.heads)
        case.round_trips.append(store.waves)
        return result

    async def run(self) -> None:
        options, split = self.options, self.options.split_factor
        vuas = {w: AsyncVUA(self.config, self.store, probe_waves=w) for w in options.waves}
        writer = vuas[max(options.waves)]
        for groups in options.groups:
            stored = self.tokens(groups)
            await writer.put(stored, _tiny_kv(stored.numel()))
            hits = sorted({0, 1, groups // 2, groups - 1, groups})
            for repeat in range(options.repeats):
                for hit in hits:
                    query = torch.cat([stored[: hit * split], self.tokens(groups - hit)])
                    for waves in _rotated(options.waves, repeat):
                        case = self.case("lookup", groups, hit, waves)
                        found = await self.measure(case, self.store, vuas[waves].lookup(query))
                        if found != hit * split:
                            raise AssertionError(f"lookup found {found} tokens, {hit * split} are stored")
            await self.put_half(groups)
        await self.cold()

    async def put_half(self, groups: int) -> None:
        """``put`` of a prompt whose first half is stored, by objects that know nothing yet;
        each budget's prompt has a tail of its own, so each put uploads half the groups."""
        half = groups // 2
        kv = _tiny_kv(groups * self.options.split_factor)
        for repeat in range(self.options.repeats):
            stored = self.tokens(half)
            await AsyncVUA(self.config, self.store).put(stored, _tiny_kv(stored.numel()))
            for waves in _rotated(self.options.waves, repeat):
                vua = AsyncVUA(self.config, self.store, probe_waves=waves)
                prompt = torch.cat([stored, self.tokens(groups - half)])
                written = await self.measure(self.case("put", groups, half, waves), self.store, vua.put(prompt, kv))
                if written != groups - half:
                    raise AssertionError(f"put wrote {written} groups, {groups - half} were missing")

    async def cold(self) -> None:
        """A fresh client per lookup: connection set-up included."""
        groups = 32 if 32 in self.options.groups else self.options.groups[0]
        stored = self.tokens(groups)
        await AsyncVUA(self.config, self.store).put(stored, _tiny_kv(stored.numel()))
        split = self.options.split_factor
        hit = groups // 2
        for repeat in range(self.options.repeats):
            query = torch.cat([stored[: hit * split], self.tokens(groups - hit)])
            for waves in _rotated(sorted({1, DEFAULT_PROBE_WAVES}), repeat):
                store = CountingStore(self.open_store())
                vua = AsyncVUA(self.config, store, probe_waves=waves)
                try:
                    await self.measure(self.case("lookup (cold)", groups, hit, waves), store, vua.lookup(query))
                finally:
                    await vua.close()

    async def clean(self) -> None:
        keys = [info.key async for info in self.store.list(self.config.namespace + "/")]
        for start in range(0, len(keys), 64):
            await asyncio.gather(*(self.store.delete(key) for key in keys[start : start + 64]))
        await self.store.close()


def _rotated(values: Sequence[int], by: int) -> list[int]:
    """``values`` starting at a different one each repeat: no budget always goes first."""
    k = by % len(values)
    return [*values[k:], *values[:k]]


def run_lookup_bench(options: LookupBenchOptions) -> dict[str, Any]:
    from .report import context

    with _location(options) as (opener, description):
        bench = _Bench(opener, options)

        async def main() -> None:
            try:
                await bench.run()
            finally:
                await bench.clean()

        asyncio.run(main())
    return {
        **context(description),
        "split_factor": options.split_factor,
        "repeats": options.repeats,
        "cases": [case.summary() for case in bench.cases],
    }


def format_lookup_report(result: dict[str, Any]) -> str:
    lines = [
        f"store: {result['store']}; {result['machine']}; {result['when']}; "
        f"load average {' '.join(f'{x:.2f}' for x in result['load_average'])}",
        f"median of {result['repeats']} repeats [min-max]; round trips = waves of HEADs; "
        "probe_waves=1 is one wave over every group",
        "",
        "| operation | groups | hit | probe_waves | HEADs | round trips | latency ms | vs one wave | CPU ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    one = {(c["operation"], c["groups"], c["hit"]): c["ms_median"] for c in result["cases"] if c["probe_waves"] == 1}
    for c in result["cases"]:
        base = one.get((c["operation"], c["groups"], c["hit"]))
        ratio = f"{c['ms_median'] / base:.2f}x" if base else ""
        lines.append(
            f"| {c['operation']} | {c['groups']} | {c['hit']} | {c['probe_waves']} | {c['heads_max']} | "
            f"{c['round_trips_max']} | {c['ms_median']:.1f} [{c['ms_min']:.1f}-{c['ms_max']:.1f}] | {ratio} | "
            f"{c['cpu_ms_median']:.1f} |"
        )
    return "\n".join(lines)
