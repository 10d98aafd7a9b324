"""The GPU bench: ``get_closest`` onto a GPU and ``put`` from one, beside the copy floors of the same run.

KV on a GPU reaches a store through host memory: a file read or S3 GET into page-locked
(pinned) memory, then a non-blocking host-to-device copy; a put is the reverse. The floors
time each step alone on the same number and sizes of objects as vua_s3 writes, and the two
steps one after the other (their composition); vua_s3's throughput over the composition's is
the ratio that matters. Each figure is the median of the repeats with min and max; the floors
and vua_s3 alternate within each repeat so background load hits both alike. The S3 server is
moto in a process of its own, so client CPU is this process alone. Without CUDA the bench runs
on the CPU as a stand-in (pageable memory, host-to-host copies): that tests the code and
measures nothing of a GPU, and the report says so.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
import torch

from ..config import VUAConfig
from ..fragment import dtype_name
from ..loop import BackgroundLoop
from ..shapes import ModelShape
from ..storage.s3 import S3Store
from ..storage.s3.settings import crt_installed
from ..sync import VUA
from ..testing.moto import EMBEDDED_CREDENTIALS, EMBEDDED_REGION, MotoProcess
from ..vua import AsyncVUA, ClosestKV
from .clients import CrtClient
from .file_floors import read_files, write_files
from .report import Sample, context, summarize

NO_CUDA = "no CUDA device: the figures are a CPU stand-in (pageable memory, host-to-host copies), not a GPU's"


@dataclass(frozen=True)
class GpuBenchOptions:
    shape: ModelShape
    tokens: int = 8192
    """Prompt length of the POSIX rows (trimmed to the split factor)."""
    s3_tokens: int = 2048
    """Prompt length of the S3 rows: moto moves a few hundred MiB/s, so fewer tokens than POSIX."""
    split_factor: int = 256
    repeats: int = 5
    posix_dir: str | None = None
    """Where the POSIX rows run (a fresh directory is made inside); ``None``: /dev/shm, else the temp dir."""
    s3: bool = True
    url: str | None = None
    """An S3 location to measure; ``None``: moto in a process of its own on 127.0.0.1."""
    threads: int = 8
    """Threads of the file floors (each reads or writes its share of the objects)."""


class _Host:
    """The floors' staging: one host buffer holding every object back to back (pinned on CUDA,
    faulted in before any clock starts) and one device buffer of the same size."""

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        total = sum(sizes)
        self.device = device
        self.buffer = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.buffer.random_(0, 256, generator=torch.Generator().manual_seed(5))
        self.on_device = torch.empty(total, dtype=torch.uint8, device=device)
        view = self.buffer.numpy().data
        ends = list(itertools.accumulate(sizes))
        self.views = [view[end - size : end] for end, size in zip(ends, sizes, strict=True)]

    def to_device(self) -> None:
        self.on_device.copy_(self.buffer, non_blocking=True)
        synchronize(self.device)

    def to_host(self) -> None:
        self.buffer.copy_(self.on_device, non_blocking=True)
        synchronize(self.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Runs:
    """Timed runs by name: wall and this process's CPU seconds, the device synchronized inside the clock."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self.samples: dict[str, list[Sample]] = {}

    def time(self, name: str, work: Callable[[], Any]) -> Any:
        cpu, wall = time.process_time(), time.perf_counter()
        out = work()
        synchronize(self._device)
        sample = Sample(time.perf_counter() - wall, time.process_time() - cpu, Counter())
        self.samples.setdefault(name, []).append(sample)
        return out

    def figures(self, moved: int) -> dict[str, dict[str, Any]]:
        figures = {}
        for name, samples in self.samples.items():
            figure = summarize(samples, moved)
            del figure["requests"]
            figures[name] = figure
        return figures


@dataclass
class _Case:
    """One store's workload: tokens, KV on the device, object sizes, the config."""

    cfg: VUAConfig
    tokens: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    moved: int


def _case(options: GpuBenchOptions, tokens: int, device: torch.device, name: str) -> _Case:
    n = tokens - tokens % options.split_factor
    if n == 0:
        raise ValueError(f"tokens ({tokens}) must be at least the split factor ({options.split_factor})")
    shape = options.shape
    generator = torch.Generator(device).manual_seed(7)
    kv = [
        tuple(
            torch.randn((1, shape.kv_heads, n, shape.head_dim), generator=generator, device=device).to(shape.dtype)
            for _ in range(2)
        )
        for _ in range(shape.layers)
    ]
    ids = torch.randint(0, 128_000, (n,), generator=torch.Generator().manual_seed(8))
    cfg = VUAConfig(split_factor=options.split_factor, namespace=f"bench-gpu-{name}")
    return _Case(cfg, ids, kv, shape.bytes_per_token * n)  # type: ignore[arg-type]


def _object_sizes(case: _Case, location: str, loop: BackgroundLoop) -> list[int]:
    """Every object's size (each group's heads share one), as stored at ``location``."""
    probe = AsyncVUA(case.cfg, location)
    try:
        sizes = loop.run(probe.stored_sizes(case.tokens))
    finally:
        loop.run(probe.close())
    return [size for size in sizes for _ in range(case.kv[0][0].size(1))]


def _exact(hit: ClosestKV | None, case: _Case) -> bool:
    """Whether ``hit`` holds the whole prompt, bit for bit."""
    if hit is None or hit.tokens.numel() != case.tokens.numel():
        return False
    return all(
        torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        for layer, stored in zip(hit.data, case.kv, strict=True)
        for got, want in zip(layer, stored, strict=True)
    )


def _vua_rows(runs: _Runs, case: _Case, location: Callable[[str], str], device: torch.device, rep: int) -> bool:
    """vua_s3's get onto ``device`` and put from it (into a new location: every object is
    written), each by a new client that has connected (a lookup of another prompt) but knows
    nothing of this one, as a server finds what another stored; whether both did it all."""
    other = case.tokens + 1
    with VUA(case.cfg, location("main")) as vua:
        vua.lookup(other)
        hit = runs.time("vua_get", lambda: vua.get_closest(case.tokens, device))
    exact = _exact(hit, case)
    del hit
    with VUA(case.cfg, location(f"put-{rep}")) as vua:
        vua.lookup(other)
        written = runs.time("vua_put", lambda: vua.put(case.tokens, case.kv))
    return exact and written == case.tokens.numel() // case.cfg.split_factor


def _posix(options: GpuBenchOptions, device: torch.device, loop: BackgroundLoop) -> dict[str, Any]:
    parent = options.posix_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    root = tempfile.mkdtemp(prefix="vua-s3-bench-gpu-", dir=parent)
    case = _case(options, options.tokens, device, "posix")
    runs, exact = _Runs(device), []

    def location(name: str) -> str:
        return os.path.join(root, name)

    try:
        with VUA(case.cfg, location("main")) as vua:
            vua.put(case.tokens, case.kv)
        sizes = _object_sizes(case, location("main"), loop)
        host = _Host(sizes, device)
        os.makedirs(location("floor"))
        paths = [os.path.join(location("floor"), f"{i}") for i in range(len(sizes))]
        threads = options.threads
        with ThreadPoolExecutor(threads, thread_name_prefix="vua-s3-floor") as pool:

            def read() -> None:
                read_files(paths, host.views, pool, threads)

            def write() -> None:
                write_files(paths, host.views, pool, threads)

            write()
            for rep in range(options.repeats):
                exact.append(_vua_rows(runs, case, location, device, rep))
                shutil.rmtree(location(f"put-{rep}"))
                _floor_rows(runs, host, ("read", read), ("write", write))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return _section(runs, case, sizes, exact, {"dir": parent, "floor_threads": options.threads})


@contextlib.contextmanager
def _s3_location(options: GpuBenchOptions) -> Iterator[tuple[str, str]]:
    """The S3 location measured and its description: the given URL, or moto in its own process."""
    if options.url:
        yield options.url, "the given S3 location"
        return
    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(
        AWS_ACCESS_KEY_ID=EMBEDDED_CREDENTIALS["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=EMBEDDED_CREDENTIALS["aws_secret_access_key"],
    )
    try:
        with MotoProcess() as server:
            yield (
                server.url(f"bench-gpu-{int(time.time())}"),
                "moto (python -m moto.server, its own process, 127.0.0.1)",
            )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _floor_rows(
    runs: _Runs, host: _Host, read: tuple[str, Callable[[], object]], write: tuple[str, Callable[[], object]]
) -> None:
    """One repeat of the floors: reading every object into the host buffer and the
    host-to-device copy, alone and one after the other; the device-to-host copy and writing
    every object out of the host buffer, likewise."""
    (got, fetch), (put, store) = read, write

    def fetch_then_copy() -> None:
        fetch()
        host.to_device()

    def copy_then_store() -> None:
        host.to_host()
        store()

    runs.time(got, fetch)
    runs.time("h2d", host.to_device)
    runs.time(f"{got}_h2d", fetch_then_copy)
    runs.time("d2h", host.to_host)
    runs.time(put, store)
    runs.time(f"d2h_{put}", copy_then_store)


def _s3(options: GpuBenchOptions, device: torch.device, loop: BackgroundLoop) -> dict[str, Any]:
    case = _case(options, options.s3_tokens, device, "s3")
    runs, exact = _Runs(device), []
    with _s3_location(options) as (url, server):
        base, _, query = url.partition("?")

        def location(name: str) -> str:
            return f"{base.rstrip('/')}/{name}?{query}"

        with VUA(case.cfg, location("main")) as vua:
            vua.put(case.tokens, case.kv)
        sizes = _object_sizes(case, location("main"), loop)
        host = _Host(sizes, device)
        floor_store = S3Store.from_url(location("floor"))
        loop.run(floor_store.head_many(["bench-connect"]))  # connects: resolves the bucket URL the C client needs
        crt = None
        if crt_installed() and floor_store.bucket_url:
            credentials = boto3.Session(region_name=EMBEDDED_REGION).get_credentials()
            crt = CrtClient(floor_store, credentials.get_frozen_credentials())
        keys = [f"{i}" for i in range(len(sizes))]
        try:
            if crt is not None:
                crt.put(keys, host.views)
            for rep in range(options.repeats):
                exact.append(_vua_rows(runs, case, location, device, rep))
                if crt is not None:
                    client = crt
                    get = functools.partial(client.get, keys, sizes, host.buffer)
                    _floor_rows(runs, host, ("get", get), ("put", functools.partial(client.put, keys, host.views)))
        finally:
            if crt is not None:
                crt.close()
            loop.run(floor_store.close())
    floor_client = "awscrt's S3 client into the pinned buffer" if crt is not None else "none (awscrt unavailable)"
    return _section(runs, case, sizes, exact, {"server": server, "floor_client": floor_client})


def _section(runs: _Runs, case: _Case, sizes: list[int], exact: list[bool], extra: dict[str, Any]) -> dict[str, Any]:
    figures = runs.figures(case.moved)
    mine = {name: figures.pop(f"vua_{name}") for name in ("get", "put")}
    return {
        **extra,
        "tokens": case.tokens.numel(),
        "objects": len(sizes),
        "bytes_moved": case.moved,
        "vua": mine,
        "floor": figures,
        "bit_exact": all(exact),
    }


#: vua_s3's figure and the floors it is set against, per section.
_PAIRS = {
    "posix": [
        ("get", "read_h2d"),
        ("get", "read"),
        ("get", "h2d"),
        ("put", "d2h_write"),
        ("put", "write"),
        ("put", "d2h"),
    ],
    "s3": [("get", "get_h2d"), ("get", "get"), ("put", "d2h_put"), ("put", "put")],
}


def run_gpu_bench(options: GpuBenchOptions) -> dict[str, Any]:
    """Every measurement; the report (what ``vua-s3 bench-gpu --json`` prints)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shape = options.shape
    report: dict[str, Any] = {
        "bench": "gpu",
        "cuda": cuda,
        "note": None if cuda else NO_CUDA,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        **context("POSIX and S3" if options.s3 else "POSIX"),
        "shape": {
            "name": shape.name,
            "layers": shape.layers,
            "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "dtype": dtype_name(shape.dtype),
        },
        "split_factor": options.split_factor,
        "repeats": options.repeats,
    }
    loop = BackgroundLoop("vua-s3-bench-gpu")
    try:
        report["posix"] = _posix(options, device, loop)
        report["s3"] = _s3(options, device, loop) if options.s3 else None
    finally:
        loop.stop()
    report["load_average_end"] = os.getloadavg()
    report["ratios"] = {
        f"{section}_{mine}_vs_{floor}": _rate(report[section]["vua"][mine]) / _rate(report[section]["floor"][floor])
        for section, pairs in _PAIRS.items()
        if report.get(section)
        for mine, floor in pairs
        if floor in report[section]["floor"]
    }
    return report


def _rate(figure: dict[str, Any]) -> float:
    return float(figure["gib_per_s"]["median"])


def checks_pass(report: dict[str, Any]) -> bool:
    """Every get found the whole prompt bit-exact and every put wrote every group."""
    return all(report[s]["bit_exact"] for s in ("posix", "s3") if report.get(s))
