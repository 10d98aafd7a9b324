"""The long-prompt rows (``--long-tokens``, e.g. 32768): put, get_closest and the vLLM-style
load of one long prompt beside awscrt on the same objects.

Memory stays in check on a shared machine: no floor or s3transfer rows (their prepared
bodies would double the KV), awscrt's bodies are views of one object-sized buffer, its
reused buffer is a ring of at most ``RING`` bytes and the paged cache holds ``CACHE_TOKENS``
(a longer prompt wraps around both). What remains is the KV itself, one fresh result at a
time and the clients' own buffers.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from ..shapes import ModelShape
from .figures import rate, sections
from .s3rows import crt_load, delete, fragment_sizes
from .session import Session
from .vllm_load import PagedCache, placements

RING = 512 << 20
CACHE_TOKENS = 4096


def measure_long(session: Session, shape: ModelShape, tokens: int, repeats: int) -> dict[str, Any]:
    """The long rows' report: ``tokens`` (trimmed to the split factor), figures, ratios."""
    run = dataclasses.replace(session, results={}, checks={})
    vua, loop, timed = run.vua, run.loop, run.timed
    cfg = vua.config()
    n = tokens - tokens % cfg.split_factor
    prompt = torch.randint(0, 128_000, (1, n), generator=torch.Generator().manual_seed(4))
    kv = shape.random_kvcache(n)
    sizes = fragment_sizes(run, prompt, kv)
    payload = torch.randint(0, 256, (max(sizes),), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    bodies = [payload.numpy().data[:size] for size in sizes]
    ring = torch.zeros(min(sum(sizes), RING), dtype=torch.uint8)
    cache = PagedCache(shape, min(n, CACHE_TOKENS), cfg.split_factor)
    heads = shape.kv_heads
    for rep in range(repeats):
        salt = f"long{rep}-{time.time_ns()}"
        keys = [f"long/{salt}/{i}" for i in range(len(sizes))]
        vua.forget_known()
        run.checks["put_written"] = timed("put_cold", vua.put, prompt, kv, salt=salt)
        if run.crt is not None:
            timed("awscrt_put", run.crt.put, keys, bodies)
        vua.forget_known()
        got = timed("get_cpu", vua.get_closest, prompt[0], "cpu", salt=salt)
        run.checks["get_cpu_tokens"] = 0 if got is None else got.tokens.numel()
        del got
        row_sizes = loop.run(run.side.stored_sizes(prompt[0], salt=salt))
        load = run.side.load_groups(prompt[0], 0, cache.place, sizes=row_sizes, salt=salt)
        run.checks["vllm_load_groups"] = timed("vllm_load", loop.run, load)
        if run.crt is not None:
            timed("awscrt_get", run.crt.get, keys, sizes)
            offsets = placements(sizes, ring.numel(), heads)
            timed("awscrt_get_reused", run.crt.get, keys, sizes, ring, offsets)
            timed("awscrt_vllm_load", crt_load, run, cache, keys, sizes, ring, heads, cfg.split_factor)
        loop.run(run.floor.delete(keys))
        loop.run(delete(run.floor.store, cfg.tokens_to_paths(prompt[0], salt=salt, kv_heads=heads)))
    moved = shape.bytes_per_token * n
    report = sections(run.results, moved, moved)
    out: dict[str, Any] = {"tokens": n, "bytes_moved": moved, "repeats": repeats, "checks": run.checks}
    out.update({"vua": report["vua"], "clients": report["clients"]})
    crt = report["clients"].get("awscrt")
    if crt:
        mine = report["vua"]
        out["ratios"] = {
            name: rate(mine[a]) / rate(crt[b])
            for name, a, b in (
                ("put_vs_awscrt", "put_cold", "put"),
                ("get_cpu_vs_awscrt", "get_cpu", "get"),
                ("vllm_load_vs_awscrt", "vllm_load", "vllm_load"),
            )
        }
    return out
