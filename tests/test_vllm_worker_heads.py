"""The connector's worker side across tensor-parallel sizes, without an engine: real paged
caches (GPU-style layout, on the CPU), a real POSIX store, the connector's own WorkerSide.

TP=4 on a model with 2 KV heads replicates each head on two ranks: only the first of each
pair uploads, so every group is two objects, once each; ``VUA.get_closest`` gives back
every head; TP=2 and TP=1 workers load exactly their heads of what TP=4 wrote. (Engines
cannot run TP=4 on this 2-core machine; tests/vllm/test_vllm_tp.py runs TP 1 and 2.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from vua_s3 import VUA, AsyncVUA, VUAConfig
from vua_s3.integrations.vllm.paged import PagedLayer
from vua_s3.integrations.vllm.plan import LoadSpec, Plan, SaveSpec
from vua_s3.integrations.vllm.problems import Problems
from vua_s3.integrations.vllm.stats import Recorder
from vua_s3.integrations.vllm.worker import WorkerSide
from vua_s3.keys import Span
from vua_s3.loop import BackgroundLoop
from vua_s3.shards import rank_heads, rank_writes

SPLIT, BLOCK, KV_HEADS, HEAD_SIZE, LAYERS = 32, 16, 2, 8, 2
GROUPS = 2
TOKENS = list(range(7, 7 + GROUPS * SPLIT))
BLOCKS = list(range(GROUPS * SPLIT // BLOCK))
CFG = VUAConfig(split_factor=SPLIT, namespace="tp-heads")


def _span() -> Span:
    """The request's whole prompt, as the scheduler side names it."""
    chain = CFG.chain(torch.tensor(TOKENS))
    return Span.of(chain, 0, len(chain))


def _save_spec(blocks: list[int]) -> SaveSpec:
    return SaveSpec("r", TOKENS, blocks, [_span()])


def _load_spec(blocks: list[int], sizes: list[int]) -> LoadSpec:
    return LoadSpec("r", TOKENS, 0, len(TOKENS), blocks, [_span()], [()], [sizes])


def _reference() -> torch.Tensor:
    """Every head's KV: ``[layers, 2, kv_heads, tokens, head_size]``."""
    return torch.randn(LAYERS, 2, KV_HEADS, len(TOKENS), HEAD_SIZE, generator=torch.Generator().manual_seed(3))


def _paged(kv: torch.Tensor | None, heads: range) -> list[torch.Tensor]:
    """One ``[blocks, heads, block_size, 2 * head_size]`` cache per layer holding ``kv``'s
    ``heads`` in blocks ``BLOCKS`` (zeros if ``kv`` is None)."""
    caches = []
    for layer in range(LAYERS):
        cache = torch.zeros(len(BLOCKS), len(heads), BLOCK, 2 * HEAD_SIZE)
        if kv is not None:
            for slot in range(2):
                part = kv[layer, slot, heads.start : heads.stop]  # [heads, tokens, head_size]
                paged = part.reshape(len(heads), len(BLOCKS), BLOCK, HEAD_SIZE).transpose(0, 1)
                cache[..., slot * HEAD_SIZE : (slot + 1) * HEAD_SIZE] = paged
        caches.append(cache)
    return caches


def _worker(store: Path, loop: BackgroundLoop, tp: int, rank: int, caches: list[torch.Tensor]) -> WorkerSide:
    layers = [PagedLayer(f"layer.{i}", c, "FLASH_ATTN", HEAD_SIZE, None) for i, c in enumerate(caches)]
    return WorkerSide(
        AsyncVUA(CFG, store, strict=True), 0, rank_heads(tp, rank, KV_HEADS), rank_writes(tp, rank, KV_HEADS),
        layers, 1, BLOCK, loop, Recorder(), Problems(logging.getLogger(__name__), "test"),
        max_pending_save_bytes=1 << 24, flush_timeout_s=30.0, where=str(store),
    )  # fmt: skip


def _load(worker: WorkerSide, sizes: list[int]) -> set[int]:
    worker.start_loads(Plan(loads=[_load_spec(BLOCKS, sizes)]))
    deadline = time.monotonic() + 30
    while "r" not in worker.finished(set())[1]:
        assert time.monotonic() < deadline, "the load did not end"
        time.sleep(0.01)
    return worker.load_errors()


def test_tp4_writes_each_replicated_head_once_and_tp2_tp1_read_their_heads(tmp_path: Path) -> None:
    kv = _reference()
    loop = BackgroundLoop()
    try:
        for rank in range(4):  # TP=4: ranks 0, 1 hold head 0; ranks 2, 3 head 1
            head = rank_heads(4, rank, KV_HEADS)
            worker = _worker(tmp_path, loop, 4, rank, _paged(kv, head.heads))
            worker.start_saves(Plan(saves=[_save_spec(BLOCKS)]))
            worker.flush(["r"])
            worker.shutdown()
        names = sorted(p.name.split(".")[1] for p in tmp_path.rglob("*.safetensors"))
        assert names == ["h0"] * GROUPS + ["h1"] * GROUPS  # each replicated head stored once

        with VUA(CFG, tmp_path) as vua:
            stored = vua.get_closest(torch.tensor(TOKENS))
        assert stored is not None and stored.tokens.tolist() == TOKENS
        for layer, (key, value) in enumerate(stored.data):
            assert torch.equal(key[0], kv[layer, 0]) and torch.equal(value[0], kv[layer, 1])

        probe = AsyncVUA(CFG, tmp_path)
        sizes = loop.run(probe.stored_sizes(torch.tensor(TOKENS)))  # head 0's, as the scheduler probes
        assert len(sizes) == GROUPS
        for tp in (2, 1):
            for rank in range(tp):
                heads = rank_heads(tp, rank, KV_HEADS).heads
                caches = _paged(None, heads)
                worker = _worker(tmp_path, loop, tp, rank, caches)
                assert _load(worker, sizes) == set()
                worker.shutdown()
                assert [torch.equal(c, e) for c, e in zip(caches, _paged(kv, heads), strict=True)] == [True] * LAYERS
    finally:
        loop.stop()


def test_a_worker_whose_cache_does_not_hold_its_heads_is_refused(tmp_path: Path) -> None:
    loop = BackgroundLoop()
    try:
        with pytest.raises(ValueError, match="KV heads per layer"):
            _worker(tmp_path, loop, 2, 0, _paged(None, range(2)))  # TP=2 rank 0 holds one head, not two
    finally:
        loop.stop()
