"""Many writers and readers on one store: processes, threads on one VUA, tasks on one AsyncVUA.

Every KV cache here is a function of its whole token prefix (a running checksum of
the tokens so far), so a reader can tell from the data alone whether it got its own
prompt's KV: any fragment of another prompt, another position or a half-written
object would show. Prompts form a tree (shared root, shared middles, own tails) so
writers race on the same keys.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from vua_s3 import VUA, AsyncVUA, ClosestKV, VUAConfig, open_store
from vua_s3 import fragment as fragment_format
from vua_s3.storage.posix import PosixStore

S = 16
CFG = VUAConfig(split_factor=S, namespace="concurrency")
LAYERS, HEADS, HEAD_DIM = 2, 2, 8


def prompts() -> list[torch.Tensor]:
    """Nine prompts: one 2-group root, three 2-group middles, three tails of 1-4 groups each."""
    gen = torch.Generator().manual_seed(11)
    root = torch.randint(0, 30_000, (2 * S,), generator=gen)
    out = []
    for _ in range(3):
        middle = torch.randint(0, 30_000, (2 * S,), generator=gen)
        for tail_groups in (1, 2, 4):
            tail = torch.randint(0, 30_000, (tail_groups * S,), generator=gen)
            out.append(torch.cat([root, middle, tail]))
    return out


PROMPTS = prompts()


def kv_for(tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV that depends on every earlier token: exact in float32 (values stay below 2**24)."""
    running = torch.cumsum(tokens.to(torch.int64) * 31 + 7, 0) % 65_521
    position = torch.arange(tokens.numel())
    base = (running * 4 + position % 4).to(torch.float32).view(1, 1, -1, 1)
    lanes = torch.arange(HEADS * HEAD_DIM, dtype=torch.float32).view(1, HEADS, 1, HEAD_DIM)
    return [(base + lanes + layer, -(base + lanes) - layer) for layer in range(LAYERS)]


def check(query: torch.Tensor, res: ClosestKV | None) -> int:
    """Assert ``res`` is exactly some stored prefix of ``query``; return its length."""
    if res is None:
        return 0
    n = res.tokens.numel()
    assert n > 0 and n % S == 0 and n <= query.numel()
    assert torch.equal(res.tokens, query[:n])
    # Worker processes import this module on their own, where "conftest" may name another
    # directory's conftest, so the comparison is spelled out here (exact, dtype and shape).
    want = kv_for(query[:n])
    assert len(res.data) == len(want)
    for got_pair, want_pair in zip(res.data, want, strict=True):
        for got, expected in zip(got_pair, want_pair, strict=True):
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)
    return n


def plan(seed: int, steps: int) -> list[tuple[str, torch.Tensor]]:
    """A random mix of puts (whole prompts or group-aligned prefixes) and reads (with extra tails)."""
    rnd = random.Random(seed)
    ops = []
    for _ in range(steps):
        prompt = PROMPTS[rnd.randrange(len(PROMPTS))]
        if rnd.random() < 0.5:
            ops.append(("put", prompt[: S * rnd.randint(1, prompt.numel() // S)]))
        else:
            extra = torch.randint(0, 30_000, (rnd.randrange(0, 2 * S),), generator=torch.Generator().manual_seed(seed))
            ops.append(("get", torch.cat([prompt, extra])))
    return ops


def run_sync(vua: VUA, seed: int, steps: int) -> tuple[list[torch.Tensor], int]:
    """Play a plan on a sync VUA; return what it stored and how many tokens its reads got."""
    stored, hit = [], 0
    for kind, tokens in plan(seed, steps):
        if kind == "put":
            vua.put(tokens, kv_for(tokens))
            stored.append(tokens)
        else:
            hit += check(tokens, vua.get_closest(tokens))
    return stored, hit


async def run_async(vua: AsyncVUA, seed: int, steps: int) -> tuple[list[torch.Tensor], int]:
    stored, hit = [], 0
    for kind, tokens in plan(seed, steps):
        if kind == "put":
            await vua.put(tokens, kv_for(tokens))
            stored.append(tokens)
        else:
            hit += check(tokens, await vua.get_closest(tokens))
    return stored, hit


def verify_store(location: str, stored: list[torch.Tensor]) -> None:
    """Every prefix anyone stored reads back whole and exact; every object is a sound fragment."""
    assert stored
    unique = list({tuple(t.tolist()): t for t in stored}.values())
    with VUA(CFG, location) as vua:
        for tokens, res in zip(unique, vua.get_closest(unique), strict=True):
            assert check(tokens, res) == tokens.numel()

    async def all_objects() -> int:
        store = open_store(location)
        try:
            count = 0
            async for info in store.list():
                assert "/.tmp-" not in info.key
                frag = fragment_format.decode(await store.get(info.key))
                assert frag.metadata["namespace"] == CFG.namespace
                count += 1
            return count
        finally:
            await store.close()

    distinct = {key for tokens in stored for key in CFG.tokens_to_paths(tokens, kv_heads=HEADS)}
    assert asyncio.run(all_objects()) == len(distinct)


def _process(location: str, seed: int, steps: int, barrier: Any, results: Any) -> None:
    """One of several processes sharing the store."""
    try:
        with VUA(CFG, location) as vua:
            barrier.wait(60)
            stored, hit = run_sync(vua, seed, steps)
        results.put((seed, [t.tolist() for t in stored], hit, None))
    except BaseException as exc:
        results.put((seed, [], 0, f"{type(exc).__name__}: {exc}"))


def test_processes_share_one_store(location: str) -> None:
    """Four processes put overlapping prefixes and read each other's, at the same time."""
    # A fork server imports torch and vua_s3 once (single-threaded, so forking it is safe);
    # the workers fork from it instead of each importing everything again.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_process, args=(location, seed, 12, barrier, results)) for seed in range(4)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert [error for *_, error in outcomes if error] == []
    assert sum(hit for _, _, hit, _ in outcomes) > 0  # reads did get data, checked token by token
    verify_store(location, [torch.tensor(t) for _, stored, _, _ in outcomes for t in stored])


def test_threads_share_one_vua(location: str, in_threads: Callable[..., None]) -> None:
    stored: list[torch.Tensor] = []
    hits: list[int] = []
    with VUA(CFG, location) as vua:

        def worker(seed: int) -> None:
            mine, hit = run_sync(vua, seed, 8)
            stored.extend(mine)
            hits.append(hit)

        in_threads(worker, 6)
    assert sum(hits) > 0
    verify_store(location, stored)


def test_tasks_share_one_async_vua(location: str) -> None:
    tasks = 12

    async def main() -> list[tuple[list[torch.Tensor], int]]:
        async with AsyncVUA(CFG, location) as vua:
            return await asyncio.gather(*(run_async(vua, seed, 6) for seed in range(tasks)))

    runs = asyncio.run(main())
    assert sum(hit for _, hit in runs) > 0
    verify_store(location, [t for stored, _ in runs for t in stored])


def test_a_cancelled_posix_write_returns_only_after_its_thread(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The caller's buffers (a pooled capture, say) are reused once a cancelled put returns:
    the thread still writing them must be done by then, or the next capture tears the object."""
    writing, finish = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        writing.set()
        finish.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    store = PosixStore(tmp_path)

    async def scenario() -> None:
        task = asyncio.ensure_future(store.put_segments("ns/ab/x", [memoryview(b"x" * 64)]))
        await asyncio.to_thread(writing.wait, 30)
        task.cancel()
        await asyncio.sleep(0.05)  # a put that let go of its thread would be done by now
        assert not task.done()
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
