"""The connector's worker side and the lifetime of vLLM's blocks, without an engine: real
paged caches on the CPU, real stores (POSIX; moto behind a fault proxy for a load that
hangs), the connector's own WorkerSide.

* a finished request's blocks are released (``finished``'s sending) once the copies out
  of them are done, never while it runs; each group stored is reported with its objects'
  size; a preempted request's copies are waited for by ``flush`` and it is not reported
  again; a rank that writes nothing reports it at once;
* a finished (aborted) request's load is cancelled while its GETs are still held, reported
  received once it stopped, with no block reported as failed and nothing written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from vua_s3 import AsyncVUA, VUAConfig
from vua_s3.integrations.vllm.paged import PagedLayer
from vua_s3.integrations.vllm.plan import LoadSpec, Plan, SaveSpec
from vua_s3.integrations.vllm.problems import Problems
from vua_s3.integrations.vllm.stats import Recorder
from vua_s3.integrations.vllm.worker import WorkerSide
from vua_s3.keys import Span
from vua_s3.loop import BackgroundLoop
from vua_s3.shards import rank_heads, rank_writes
from vua_s3.testing.faultproxy import Fault, FaultProxy
from vua_s3.testing.moto import EmbeddedS3

SPLIT, BLOCK, KV_HEADS, HEAD_SIZE, LAYERS = 32, 16, 2, 8, 2
TOKENS = list(range(7, 7 + 2 * SPLIT))
BLOCKS = list(range(2 * SPLIT // BLOCK))
CFG = VUAConfig(split_factor=SPLIT, namespace="lifecycle")


def _span(tokens: list[int]) -> Span:
    chain = CFG.chain(torch.tensor(tokens))
    return Span.of(chain, 0, len(chain))


def _save(req: str, tokens: list[int], blocks: list[int]) -> SaveSpec:
    return SaveSpec(req, tokens, blocks, [_span(tokens)])


POLLS = 3000


def _caches(fill: bool, heads: int = KV_HEADS) -> list[torch.Tensor]:
    make = torch.randn if fill else torch.zeros
    return [make(len(BLOCKS), heads, BLOCK, 2 * HEAD_SIZE) for _ in range(LAYERS)]


def _worker(store: str, loop: BackgroundLoop, caches: list[torch.Tensor], tp: int = 1, rank: int = 0) -> WorkerSide:
    layers = [PagedLayer(f"layer.{i}", c, "FLASH_ATTN", HEAD_SIZE, None) for i, c in enumerate(caches)]
    return WorkerSide(
        AsyncVUA(CFG, store, strict=True), 0, rank_heads(tp, rank, KV_HEADS), rank_writes(tp, rank, KV_HEADS),
        layers, 1, BLOCK, loop, Recorder(), Problems(logging.getLogger(__name__), "test"),
        max_pending_save_bytes=1 << 24, flush_timeout_s=30.0, where=store,
    )  # fmt: skip


def _until_sent(worker: WorkerSide, req_id: str) -> int:
    """Steps (``get_finished`` calls) until ``req_id`` is reported sending."""
    for step in range(POLLS):
        if req_id in worker.finished(set())[0]:
            return step
        worker.flush([])  # what a step does meanwhile: wait for nothing
    raise AssertionError(f"{req_id} never reported")


def test_finished_requests_hold_their_blocks_until_their_copies_are_done(tmp_path: Path) -> None:
    loop = BackgroundLoop()
    try:
        worker = _worker(str(tmp_path), loop, _caches(True))
        worker.start_saves(Plan(saves=[_save("run", TOKENS, BLOCKS)]))
        worker.start_saves(Plan(saves=[_save("pre", list(range(500, 500 + SPLIT)), BLOCKS[:2])]))
        for _ in range(20):  # running: its blocks are never released, however long its copies took
            assert worker.finished(set()) == (set(), set())
        worker.flush(["pre"])  # preempted: its copies end before the step that may reuse its blocks
        sending, _ = worker.finished({"run", "pre"})  # both finish now
        assert "pre" not in sending  # vLLM already freed it; never reported
        if "run" not in sending:
            _until_sent(worker, "run")
        assert not worker.holds()
        assert worker.finished(set()) == (set(), set())  # reported once
        worker.shutdown()
        objects = list(tmp_path.rglob("*.safetensors"))
        assert len(objects) == 3 * KV_HEADS  # and everything stored, each group reported with its size
        settled = sorted((s.req_id, s.group, s.stage, s.size) for s in worker.take_settled())
        probe = AsyncVUA(CFG, str(tmp_path))
        run = loop.run(probe.stored_sizes(torch.tensor(TOKENS)))
        (pre,) = loop.run(probe.stored_sizes(torch.tensor(range(500, 500 + SPLIT))))
        assert settled == [("pre", 0, 0, pre), ("run", 0, 0, run[0]), ("run", 1, 0, run[1])]
        loop.run(probe.close())

        idle = _worker(str(tmp_path), loop, _caches(True, heads=1), tp=4, rank=1)  # a replica a lower rank writes
        idle.start_saves(Plan(saves=[_save("r", TOKENS, BLOCKS)]))
        assert idle.finished({"r"})[0] == {"r"}
        idle.shutdown()
    finally:
        loop.stop()


def test_an_aborted_load_is_cancelled_while_its_gets_are_held(moto_server: EmbeddedS3) -> None:
    loop = BackgroundLoop()
    proxy = FaultProxy(moto_server.port).start()
    url = f"s3://{moto_server.bucket}/abort?endpoint_url={proxy.endpoint_url}&region=us-east-1&addressing=path"
    try:
        writer = _worker(url, loop, _caches(True))
        writer.start_saves(Plan(saves=[_save("w", TOKENS, BLOCKS)]))
        writer.shutdown()
        sizes = loop.run(AsyncVUA(CFG, url).stored_sizes(torch.tensor(TOKENS)))
        assert len(sizes) == 2

        proxy.faults = [Fault("hold", method="GET")]
        caches = _caches(False)
        reader = _worker(url, loop, caches)
        reader.start_loads(Plan(loads=[LoadSpec("r", TOKENS, 0, len(TOKENS), BLOCKS, [_span(TOKENS)], [()], [sizes])]))
        assert proxy.held.wait(30)
        _, recving = reader.finished({"r"})  # the request finished (aborted): its load is cancelled
        for _ in range(POLLS):  # steps, while the proxy holds the GETs (for 30 s)
            if "r" in recving:
                break
            time.sleep(0.005)
            _, recving = reader.finished(set())
        assert "r" in recving and proxy.held.is_set()
        assert reader.load_errors() == set()  # its request is gone: no block to recompute
        assert all(not c.any() for c in caches)  # nothing it fetched was written
        assert sum(1 for r in proxy.requests if r.method == "GET" and r.status) == 0  # no GET answered
        reader.shutdown()
    finally:
        proxy.release()
        proxy.stop()
        loop.stop()
