"""The S3 rows of one bench run: every vua_s3 verb beside the floor and the other clients,
on the same objects, the repeats interleaved so background load hits all alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .. import memory
from ..loop import gather_or_cancel
from ..shapes import ModelShape
from ..storage.s3 import S3Store
from ..vua import ClosestKV
from .baseline import floor_get, floor_put
from .report import Sample
from .session import Session
from .vllm_load import PagedCache, placements

LARGE_OBJECT = 32 << 20
"""The object size of the layout without per-head objects (a group of every head, or more)."""


def fragment_sizes(session: Session, tokens: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """The sizes of the objects vua_s3 writes for ``tokens``, row by row, group by group,
    head by head."""
    cfg = session.vua.config()
    session.vua.put(tokens, kv, salt="sizes")
    heads = kv[0][0].size(1)
    keys = [k for row in tokens.unbind(0) for k in cfg.tokens_to_paths(row, salt="sizes", kv_heads=heads)]
    infos = session.loop.run(session.floor.store.head_many(keys))
    sizes = [info.size for info in infos if info is not None]
    assert len(sizes) == len(keys)
    session.loop.run(delete(session.floor.store, keys))
    return sizes


def measure_s3(
    session: Session,
    shape: ModelShape,
    tokens: torch.Tensor,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    devices: list[str],
    repeats: int,
    cold: Callable[[torch.Tensor, str], Sample] | None,
) -> list[int]:
    """Every S3 row, ``repeats`` times; returns the objects' sizes (the POSIX rows reuse them)."""
    vua, loop, floor, timed = session.vua, session.loop, session.floor, session.timed
    cfg, checks = vua.config(), session.checks
    n = tokens.size(1)
    rows = list(tokens.unbind(0))
    forget = vua.forget_known  # measure as another process would: nothing known
    heads = shape.kv_heads  # one object per group and KV head (format 2)

    sizes = fragment_sizes(session, tokens, kv)
    payload = torch.randint(0, 256, (max(sizes),), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    whole = [payload[:size].numpy().tobytes() for size in sizes]
    bodies = [floor.prepare(body) for body in whole]
    large_size = min(LARGE_OBJECT, sum(sizes))
    large = [large_size] * -(-sum(sizes) // large_size)
    large_body = payload.repeat(-(-large_size // payload.numel()))[:large_size].numpy().tobytes()
    reused = torch.zeros(sum(sizes), dtype=torch.uint8)  # faulted in once, before the clock
    row_objects = len(sizes) // len(rows)
    cache = PagedCache(shape, n, cfg.split_factor)
    session.step("prepared")

    half = torch.cat([rows[0][: n // 2], rows[0][n // 2 :] + 1])
    # Three times the groups, the first third stored: a long prompt that starts with a stored one.
    longer = torch.cat([rows[0], torch.randint(0, 128_000, (2 * n,), generator=torch.Generator().manual_seed(3))])
    for rep in range(repeats):
        salt = f"r{rep}-{time.time_ns()}"
        floor_keys = [f"floor/{salt}/{i}" for i in range(len(sizes))]
        client_keys = [f"clients/{salt}/{i}" for i in range(len(sizes))]
        large_keys = [f"large/{salt}/{i}" for i in range(len(large))]
        forget()
        checks["put_written"] = timed("put_cold", vua.put, tokens, kv, salt=salt)
        written = time.time()
        timed("floor_put", loop.run, floor_put(floor, floor_keys, bodies))
        timed("s3transfer_put", session.transfer.put, client_keys, whole)
        if session.crt is not None:
            timed("awscrt_put", session.crt.put, client_keys, whole)
            timed("awscrt_put_32mib", session.crt.put, large_keys, [large_body] * len(large))
        forget()
        checks["reput_written"] = timed("put_stored", vua.put, tokens, kv, salt=salt)
        timed("put_stored_cached", vua.put, tokens, kv, salt=salt)
        for device in devices:
            forget()
            got: list[ClosestKV | None] = timed(f"get_{device}", vua.get_closest, rows, device, salt=salt)
            checks[f"get_{device}_tokens"] = sum(0 if g is None else g.tokens.numel() for g in got)
            del got
            timed(f"floor_get_{device}", loop.run, floor_get(floor, floor_keys, sizes))
        timed("s3transfer_get", session.transfer.get, client_keys, sizes)
        row_sizes = loop.run(session.side.stored_sizes(rows[0], salt=salt))  # the scheduler's lookup
        load = session.side.load_groups(rows[0], 0, cache.place, sizes=row_sizes, salt=salt)
        checks["vllm_load_groups"] = timed("vllm_load", loop.run, load)
        if session.crt is not None:
            timed("awscrt_get", session.crt.get, client_keys, sizes)
            timed("awscrt_get_reused", session.crt.get, client_keys, sizes, reused)
            timed("awscrt_get_32mib", session.crt.get, large_keys, large)
            reference = (session, cache, client_keys[:row_objects], sizes, reused, heads, cfg.split_factor)
            timed("awscrt_vllm_load", crt_load, *reference)
        timed("page_faults", touch_fresh, sum(sizes), False)
        timed("page_faults_huge", touch_fresh, sum(sizes), True)
        if cold is not None:
            session.record("get_cold", cold(rows[0], salt))
        for kind, query in (("full", rows[0]), ("half", half), ("miss", rows[0] + 1), ("long", longer)):
            forget()
            checks[f"lookup_{kind}"] = timed(f"lookup_{kind}", vua.lookup, query, salt=salt)
        group_heads = cfg.tokens_to_paths(rows[0], salt=salt, kv_heads=heads)[:heads]  # group 0's objects
        for _ in range(3):
            timed("floor_head", loop.run, floor.head(floor_keys[0]))
            timed("floor_list", loop.run, floor.list(group_heads))
        if session.refresh is not None:
            for name, sample in session.refresh.measure(rows, salt, written, rep).items():
                session.record(f"refresh_{name}", sample)
        loop.run(floor.delete(floor_keys + client_keys + large_keys))
        loop.run(delete(floor.store, [k for row in rows for k in cfg.tokens_to_paths(row, salt=salt, kv_heads=heads)]))
    return sizes


def crt_load(
    session: Session,
    cache: PagedCache,
    keys: list[str],
    sizes: list[int],
    buffer: torch.Tensor,
    heads: int,
    split_factor: int,
) -> None:
    """The vLLM-style load's reference: awscrt into a reused buffer, then the same one copy
    of every group into the paged cache."""
    assert session.crt is not None
    offsets = placements(sizes[: len(keys)], buffer.numel(), heads)
    session.crt.get(keys, sizes[: len(keys)], buffer, offsets)
    cache.place_raw(buffer, offsets, sizes, split_factor)


def touch_fresh(size: int, huge: bool) -> None:
    """What fresh memory costs: a new buffer of ``size`` bytes, written once (page faults),
    from ``torch.empty`` (4 KiB pages) or a new huge-page backed mapping (:mod:`vua_s3.memory`,
    never one it keeps for reuse)."""
    (memory.empty_bytes(size, reuse=False) if huge else torch.empty(size, dtype=torch.uint8)).fill_(1)


async def delete(store: S3Store, keys: list[str]) -> None:
    await gather_or_cancel(*(store.delete(k) for k in keys))
