"""``soak``: a long run of everything at once against a real S3 server, then the books are checked.

A SeaweedFS server (``testing.seaweed``) sits behind the fault proxy (``testing.faultproxy``).
Four worker processes put, load and probe overlapping prefixes of two models (one whose
fragments go up as multipart uploads, one whose go in one PUT) through the proxy, while this
process runs ``gc --max-bytes`` in a loop and has the proxy inject connection resets, 503
SlowDown answers and whole-endpoint outages on a fixed schedule. At the end: every KV a
worker got back must be bit-exact, a final gc must leave no multipart upload behind and
the fragments within the byte cap, each worker's RSS must not have grown past a bound after
its warm-up, and closing its cache after the run must leave no more file descriptors open
than closing it after the warm-up did (the awscrt client is shared by the process and stays).

``vua-s3 soak --minutes 15`` prints the figures.
"""

from __future__ import annotations

import asyncio
import gc as gc_module
import logging
import multiprocessing
import os
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import VUAConfig
from ..errors import StoreError
from ..keys import is_fragment_key
from ..sync import VUA
from ..testing.faultproxy import Fault, FaultProxy
from ..testing.moto import EMBEDDED_CREDENTIALS, EMBEDDED_REGION
from ..testing.seaweed import SeaweedS3
from .gc import gc

WORKERS = 4
DOCUMENTS = 12
GROUPS = 6
SPLIT = 64
#: (namespace, layers, kv heads, head_dim): 512 KiB fragments (multipart) and 32 KiB ones.
MODELS = (("soak-multipart", 8, 4, 64), ("soak-small", 2, 2, 32))
MAX_BYTES = 16 << 20
RSS_BOUND = 64 << 20
"""How much a worker's resident memory may grow after its warm-up."""
SETTINGS = "max_attempts=3&connect_timeout=2&read_timeout=10&multipart_threshold=256KiB&part_size=5MiB"


@dataclass
class WorkerReport:
    """One worker's operations and what it saw."""

    worker: int
    puts: int = 0
    gets: int = 0
    lookups: int = 0
    hits: int = 0
    short_hits: int = 0
    """Hits shorter than the prompt asked for (not stored yet, evicted, or cut by a fault)."""
    groups_written: int = 0
    bytes_put: int = 0
    bytes_read: int = 0
    wrong_kv: int = 0
    put_failures: int = 0
    read_errors: list[str] = field(default_factory=list)
    loop_errors: list[str] = field(default_factory=list)
    """What asyncio reported on its own: task exceptions nobody retrieved, callbacks that raised."""
    rss_after_warmup: int = 0
    rss_end: int = 0
    fds_before: int = 0
    fds_after_close: int = 0


@dataclass
class SoakReport:
    """The whole run: the workers' figures, the faults, gc, and the final checks."""

    seconds: float
    workers: list[WorkerReport]
    faults: dict[str, int]
    gc_runs: int = 0
    gc_failures: int = 0
    gc_deleted: int = 0
    orphan_uploads: int = 0
    store_bytes: int = 0
    max_bytes: int = MAX_BYTES
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ops = sum(w.puts + w.gets + w.lookups for w in self.workers)
        lines = [
            f"soak: {self.seconds:.0f} s, {len(self.workers)} worker processes, {ops} operations "
            f"({sum(w.puts for w in self.workers)} put, {sum(w.gets for w in self.workers)} get_closest, "
            f"{sum(w.lookups for w in self.workers)} lookup)",
            f"  written {sum(w.groups_written for w in self.workers)} fragments, "
            f"{sum(w.bytes_put for w in self.workers) / 2**20:.0f} MiB; read "
            f"{sum(w.bytes_read for w in self.workers) / 2**20:.0f} MiB in "
            f"{sum(w.hits for w in self.workers)} hits ({sum(w.short_hits for w in self.workers)} shorter than asked); "
            f"{sum(w.put_failures for w in self.workers)} puts failed under faults",
            "  faults injected: " + ", ".join(f"{n} {kind}" for kind, n in self.faults.items()),
            f"  gc --max-bytes {self.max_bytes >> 20}MiB: {self.gc_runs} runs ({self.gc_failures} failed), "
            f"{self.gc_deleted} fragments evicted",
            f"  wrong KV: {sum(w.wrong_kv for w in self.workers)}; read errors: "
            f"{sum(len(w.read_errors) for w in self.workers)}; after the final gc: {self.orphan_uploads} multipart "
            f"uploads, {self.store_bytes / 2**20:.1f} MiB of fragments (cap {self.max_bytes / 2**20:.0f} MiB)",
            "  worker RSS growth after warm-up (MiB): "
            + ", ".join(f"{(w.rss_end - w.rss_after_warmup) / 2**20:+.1f}" for w in self.workers)
            + f" (bound {RSS_BOUND >> 20}); fds before/after: "
            + ", ".join(f"{w.fds_before}/{w.fds_after_close}" for w in self.workers),
        ]
        lines.append("  result: " + ("PASS" if not self.problems else "FAIL: " + "; ".join(self.problems)))
        return "\n".join(lines)


def _document(model: tuple[str, int, int, int], doc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ``doc``'s tokens and KV ([layers, 2, heads, tokens, dim]); every document
    starts with the same group (a shared system prompt), so prefixes overlap across them."""
    _name, layers, heads, dim = model
    shared = torch.Generator().manual_seed(1)
    own = torch.Generator().manual_seed(1000 + doc)
    tokens = torch.cat(
        [
            torch.randint(0, 50_000, (SPLIT,), generator=shared),
            torch.randint(0, 50_000, ((GROUPS - 1) * SPLIT,), generator=own),
        ]
    )
    kv = torch.cat(
        [
            torch.randn(layers, 2, heads, SPLIT, dim, generator=shared).to(torch.bfloat16),
            torch.randn(layers, 2, heads, (GROUPS - 1) * SPLIT, dim, generator=own).to(torch.bfloat16),
        ],
        dim=3,
    )
    return tokens, kv


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _worker(index: int, url: str, seconds: float, results: Any) -> None:
    """Put, load and probe random prefixes until the time is up; report what happened."""
    rng = random.Random(index)
    report = WorkerReport(worker=index)
    catch = _Collect(report.loop_errors)
    logging.getLogger("asyncio").addHandler(catch)
    docs = {model[0]: [_document(model, d) for d in range(DOCUMENTS)] for model in MODELS}

    def open_caches() -> dict[str, VUA]:
        return {model[0]: VUA(VUAConfig(split_factor=SPLIT, namespace=model[0]), url, timeout=10.0) for model in MODELS}

    caches = open_caches()
    started = time.monotonic()
    warm = started + max(10.0, seconds / 4)
    rewarm = warm + max(5.0, seconds / 8)
    while time.monotonic() - started < seconds:
        if report.rss_after_warmup == 0 and report.fds_before and time.monotonic() > rewarm:
            report.rss_after_warmup = _rss()  # the reopened stores warm again (pools, connections) first
        if not report.fds_before and time.monotonic() > warm:
            # The transports' process-wide state (awscrt's event loop threads and host
            # resolver, botocore's loaders) is made on first use, under this load: the stores
            # are closed and opened again after the warm-up, and the descriptors then are the
            # baseline, so the check sees what grows with use.
            for vua in caches.values():
                vua.close()
            report.fds_before = _fds()
            caches = open_caches()
        name = rng.choice([m[0] for m in MODELS])
        vua = caches[name]
        tokens, kv = docs[name][rng.randrange(DOCUMENTS)]
        n = rng.randint(1, GROUPS) * SPLIT
        action = rng.random()
        try:
            if action < 0.4:
                report.puts += 1
                layers = [
                    (kv[layer, 0, :, :n].unsqueeze(0), kv[layer, 1, :, :n].unsqueeze(0)) for layer in range(kv.size(0))
                ]
                try:
                    written = vua.put(tokens[:n], layers)
                except StoreError:
                    report.put_failures += 1
                    continue
                report.groups_written += written
                report.bytes_put += written * kv[:, :, :, :SPLIT].numel() * kv.element_size()
            elif action < 0.85:
                report.gets += 1
                res = vua.get_closest(tokens[:n])
                if res is None:
                    continue
                got = res.tokens.numel()
                report.hits += 1
                report.short_hits += got < n
                report.bytes_read += got * kv[:, :, :, :1].numel() * kv.element_size()
                want = kv[:, :, :, :got]
                exact = torch.equal(res.tokens, tokens[:got]) and len(res.data) == kv.size(0)
                for layer, (k, v) in enumerate(res.data):
                    exact = exact and _same(k[0], want[layer, 0]) and _same(v[0], want[layer, 1])
                report.wrong_kv += not exact
            else:
                report.lookups += 1
                vua.lookup(tokens[:n])
        except Exception as exc:  # reads must never raise (outages are misses): count and go on
            report.read_errors.append(repr(exc)[:300])
    report.rss_end = _rss()
    for vua in caches.values():
        vua.close()
    del vua, caches
    gc_module.collect()  # a task nobody awaited is reported when it is collected; cycles freed
    deadline = time.monotonic() + 10.0  # native clients release their threads after the last reference
    while _fds() > report.fds_before and time.monotonic() < deadline:
        time.sleep(0.1)
    report.fds_after_close = _fds()
    logging.getLogger("asyncio").removeHandler(catch)
    results.put(asdict(report))


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        self._into.append(record.getMessage()[:300])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.contiguous().view(torch.int16))
    )


class _Schedule:
    """Faults on a fixed 10-second cycle: resets, then 503s; a 2-second outage every minute."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.outages = 0
        self.stop = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self.stop.wait(1.0):
            tick += 1
            phase = tick % 10
            if tick % 60 == 30:
                self.proxy.down()
                self.outages += 1
                self.stop.wait(2.0)
                self.proxy.up()
            elif phase == 4:
                self.proxy.faults = [
                    Fault("reset", method="PUT", after_bytes=64 << 10, times=2),
                    Fault("reset", method="GET", times=2),
                    Fault("reset", method="HEAD", times=2),
                ]
            elif phase == 6:
                self.proxy.faults = [Fault("status", status=503, code="SlowDown", times=8)]
            elif phase == 8:
                self.proxy.faults = []


def soak(seconds: float, *, max_bytes: int = MAX_BYTES) -> SoakReport:
    """Run the soak for ``seconds`` and check the books; the report says what failed."""
    os.environ.update(
        AWS_ACCESS_KEY_ID=EMBEDDED_CREDENTIALS["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=EMBEDDED_CREDENTIALS["aws_secret_access_key"],
        AWS_DEFAULT_REGION=EMBEDDED_REGION,
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    with SeaweedS3() as server, FaultProxy(server.port) as proxy:
        direct = server.url("soak")
        via_proxy = f"s3://{server.bucket}/soak?endpoint_url={proxy.endpoint_url}&region={EMBEDDED_REGION}&addressing=path&{SETTINGS}"
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        workers = [context.Process(target=_worker, args=(i, via_proxy, seconds, results)) for i in range(WORKERS)]
        schedule = _Schedule(proxy)
        faults = threading.Thread(target=schedule.run, daemon=True)
        started = time.monotonic()
        for worker in workers:
            worker.start()
        faults.start()
        report = SoakReport(seconds=seconds, workers=[], faults={}, max_bytes=max_bytes)
        while any(w.is_alive() for w in workers) and results.qsize() < WORKERS:
            try:
                run = asyncio.run(gc(via_proxy, max_bytes=max_bytes, stale_after=60.0))
                report.gc_deleted += run.deleted
            except StoreError:
                report.gc_failures += 1
            report.gc_runs += 1
            time.sleep(2.0)
        reports = []
        for _ in workers:
            try:
                reports.append(WorkerReport(**results.get(timeout=120)))
            except queue.Empty:
                break
        for worker in workers:
            worker.join(60)
        schedule.stop.set()
        faults.join()
        proxy.faults = []
        report.seconds = time.monotonic() - started
        report.workers = sorted(reports, key=lambda w: w.worker)
        report.faults = {
            "connection resets": proxy.served("reset"),
            "503 SlowDown": proxy.served("status"),
            "2-second outages": schedule.outages,
        }
        final = asyncio.run(gc(direct, max_bytes=max_bytes, stale_after=0.0))
        report.gc_deleted += final.deleted
        client = server.client()
        uploads = client.list_multipart_uploads(Bucket=server.bucket, Prefix="soak/").get("Uploads", [])
        report.orphan_uploads = len(uploads)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix="soak/")
        report.store_bytes = sum(
            o["Size"] for page in pages for o in page.get("Contents", []) if is_fragment_key(o["Key"][len("soak/") :])
        )
    report.problems = _problems(report)
    return report


def _problems(report: SoakReport) -> list[str]:
    problems = []
    if len(report.workers) < WORKERS:
        problems.append(f"only {len(report.workers)} of {WORKERS} workers reported (see their tracebacks)")
    if sum(w.wrong_kv for w in report.workers):
        problems.append(f"{sum(w.wrong_kv for w in report.workers)} wrong KV")
    errors = [e for w in report.workers for e in w.read_errors]
    if errors:
        problems.append(f"{len(errors)} reads raised, e.g. {errors[0]}")
    loop_errors = [e for w in report.workers for e in w.loop_errors]
    if loop_errors:
        problems.append(f"asyncio reported {len(loop_errors)} errors, e.g. {loop_errors[0]}")
    if report.orphan_uploads:
        problems.append(f"{report.orphan_uploads} multipart uploads left after the final gc")
    if report.store_bytes > report.max_bytes:
        problems.append(f"{report.store_bytes} bytes of fragments, over the cap of {report.max_bytes}")
    for w in report.workers:
        if w.rss_after_warmup and w.rss_end - w.rss_after_warmup > RSS_BOUND:
            problems.append(f"worker {w.worker} RSS grew {(w.rss_end - w.rss_after_warmup) >> 20} MiB after warm-up")
        if w.fds_after_close > w.fds_before:  # fewer: idle pooled connections the shared C client dropped
            problems.append(f"worker {w.worker} has {w.fds_after_close} fds after closing, {w.fds_before} before")
        if not w.hits or not w.groups_written:
            problems.append(f"worker {w.worker} never hit or never wrote: the soak tested nothing")
    return problems
