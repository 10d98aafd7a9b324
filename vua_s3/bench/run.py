"""The bench's measurements: vua_s3's figures beside the raw S3 transfer floor, in one run.

A KV store exists to beat prefill time, so what matters is its overhead over moving
the same bytes with plain S3 calls. For every figure the bench also moves the same
bytes, in the same number and size of objects, with plain aioboto3 calls (same
settings, concurrency and part size, bodies prepared before the clock starts, no
serialization), and prints vua_s3's figure beside that floor. Repeats interleave
vua_s3 and the floor so background load hits both alike; each figure is the median
of the repeats with their min and max.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aioboto3
import torch

from ..config import VUAConfig
from ..fragment import dtype_name
from ..logsafe import redact_url
from ..loop import BackgroundLoop, gather_or_cancel
from ..shapes import ModelShape
from ..storage.s3 import S3Settings, S3Store
from ..testing.moto import EMBEDDED_CREDENTIALS
from ..vua import VUA, ClosestKV
from .baseline import Floor, floor_get, floor_put
from .report import Sample, describe_machine, summarize

_T = TypeVar("_T")


class _Meter:
    """Times a run: wall and CPU seconds, and the requests the measured store made."""

    def __init__(self, store: S3Store) -> None:
        self._store = store

    @contextlib.contextmanager
    def measure(self) -> Iterator[Sample]:
        before = Counter(self._store.requests)
        sample = Sample(0.0, 0.0, Counter())
        cpu, wall = time.process_time(), time.perf_counter()
        yield sample
        sample.seconds = time.perf_counter() - wall
        sample.cpu = time.process_time() - cpu
        sample.requests = self._store.requests - before


@dataclass(frozen=True)
class BenchOptions:
    shape: ModelShape
    tokens: int = 4096
    split_factor: int = 256
    batch: int = 1
    repeats: int = 5
    max_inflight: int | None = None
    url: str | None = None
    server: str = "auto"
    s3_options: dict[str, str] = field(default_factory=dict)
    progress: bool = False


class _Progress:
    """A progress bar on a terminal (rich if installed), silent otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        try:
            from rich.progress import Progress
        except ImportError:
            return
        self._bar = Progress(transient=True)
        self._bar.start()
        self._task = self._bar.add_task("bench", total=total)

    def step(self, label: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=label)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


@contextlib.contextmanager
def _server(options: BenchOptions) -> Iterator[tuple[str, aioboto3.Session, str]]:
    """(URL, session, description) of the server to measure: the given URL or one started here."""
    if options.url:
        settings = S3Settings.from_query(urlsplit(options.url).query)
        yield options.url, aioboto3.Session(profile_name=settings.profile), redact_url(options.url).split("?")[0]
        return
    from ..testing.seaweed import SeaweedS3, seaweed_available

    kind = options.server
    if kind == "auto":
        kind = "seaweedfs" if seaweed_available() else "moto"
    if kind == "seaweedfs":
        server: Any = SeaweedS3()
        description = "SeaweedFS (weed server, local, 127.0.0.1)"
    else:
        from ..testing.moto import EmbeddedS3

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = EmbeddedS3()
        description = "moto (embedded, 127.0.0.1)"
    with server:
        yield server.url(f"bench-{int(time.time())}"), aioboto3.Session(**EMBEDDED_CREDENTIALS), description


def _with_options(url: str, s3_options: dict[str, str]) -> str:
    extra = "&".join(f"{k}={v}" for k, v in s3_options.items())
    if not extra:
        return url
    return f"{url}{'&' if '?' in url else '?'}{extra}"


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run every measurement and return the report (what ``--json`` prints)."""
    shape, batch = options.shape, options.batch
    cfg = VUAConfig(split_factor=options.split_factor, namespace=f"bench-{shape.name}")
    n = options.tokens - options.tokens % options.split_factor
    if n == 0:
        raise ValueError(f"--tokens must be at least --split-factor ({options.split_factor})")
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128_000, (batch, n), generator=generator)
    kv = shape.random_kvcache(n, batch=batch)
    groups = n // options.split_factor
    moved = shape.bytes_per_token * n * batch
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    steps = options.repeats * (10 + len(devices) * 2) + 1
    progress = _Progress(options.progress, steps)
    vua_options = {} if options.max_inflight is None else {"max_inflight": options.max_inflight}
    try:
        with _server(options) as (url, session, where):
            url = _with_options(url, options.s3_options)
            store = S3Store.from_url(url, session=session)
            counter = _Meter(store)
            loop = BackgroundLoop("vua-s3-bench-floor")
            floor = Floor(S3Store.from_url(url, session=session), session)
            with VUA(cfg, store, **vua_options) as vua:
                loop.run(floor.open())
                try:
                    report = _measure(vua, floor, loop, counter, tokens, kv, devices, options, progress)
                finally:
                    loop.run(floor.close())
                    loop.stop()
    finally:
        progress.close()
    report.update(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": describe_machine(),
            "server": where,
            "shape": {
                "name": shape.name,
                "layers": shape.layers,
                "kv_heads": shape.kv_heads,
                "head_dim": shape.head_dim,
                "dtype": dtype_name(shape.dtype),
            },
            "tokens": n,
            "split_factor": options.split_factor,
            "batch": batch,
            "groups": groups * batch,
            "bytes_moved": moved,
            "repeats": options.repeats,
            "settings": {
                "concurrency": store.settings.concurrency,
                "part_size": store.settings.part_size,
                "multipart_threshold": store.settings.multipart_threshold,
                "checksum": store.settings.checksum,
                "max_inflight": vua._async._max_inflight,
            },
        }
    )
    return report


def _measure(
    vua: VUA,
    floor: Floor,
    loop: BackgroundLoop,
    counter: _Meter,
    tokens: torch.Tensor,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    devices: list[str],
    options: BenchOptions,
    progress: _Progress,
) -> dict[str, Any]:
    cfg = vua.config()
    batch, n = tokens.shape
    moved = options.shape.bytes_per_token * n * batch
    rows = list(tokens.unbind(0))
    forget = vua._async._known.clear  # measure as another process would: nothing known

    # Sizes and bodies of the floor's objects: the fragments vua_s3 writes.
    vua.put(tokens, kv, salt="sizes")
    heads = options.shape.kv_heads  # one object per group and KV head (format 2)
    keys = [k for row in rows for k in cfg.tokens_to_paths(row, salt="sizes", kv_heads=heads)]
    infos = loop.run(floor.store.head_many(keys))
    sizes = [info.size for info in infos if info is not None]
    assert len(sizes) == len(keys)
    payload = torch.randint(0, 256, (max(sizes),), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    bodies = [floor.prepare(payload[:size].numpy().tobytes()) for size in sizes]
    progress.step("prepared")

    results: dict[str, list[Sample]] = {}

    def timed(name: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        with counter.measure() as sample:
            out = fn(*args, **kwargs)
        results.setdefault(name, []).append(sample)
        progress.step(name)
        return out

    checks: dict[str, Any] = {}
    half = torch.cat([rows[0][: n // 2], rows[0][n // 2 :] + 1])
    for rep in range(options.repeats):
        salt = f"r{rep}-{time.time_ns()}"
        floor_keys = [f"floor/{salt}/{i}" for i in range(len(sizes))]
        forget()
        checks["put_written"] = timed("put_cold", vua.put, tokens, kv, salt=salt)
        timed("floor_put", loop.run, floor_put(floor, floor_keys, bodies))
        forget()
        checks["reput_written"] = timed("put_stored", vua.put, tokens, kv, salt=salt)
        timed("put_stored_cached", vua.put, tokens, kv, salt=salt)
        for device in devices:
            forget()
            got: list[ClosestKV | None] = timed(f"get_{device}", vua.get_closest, rows, device, salt=salt)
            checks[f"get_{device}_tokens"] = sum(0 if g is None else g.tokens.numel() for g in got)
            del got
            timed(f"floor_get_{device}", loop.run, floor_get(floor, floor_keys, sizes))
        for kind, query in (("full", rows[0]), ("half", half), ("miss", rows[0] + 1)):
            forget()
            checks[f"lookup_{kind}"] = timed(f"lookup_{kind}", vua.lookup, query, salt=salt)
        for _ in range(3):
            timed("floor_head", loop.run, floor.head(floor_keys[0]))
        loop.run(floor.delete(floor_keys))
        loop.run(_delete(floor.store, [k for row in rows for k in cfg.tokens_to_paths(row, salt=salt, kv_heads=heads)]))

    report: dict[str, Any] = {"vua": {}, "floor": {}, "ratios": {}, "checks": checks}
    for name, samples in results.items():
        side = "floor" if name.startswith("floor_") else "vua"
        label = name.removeprefix("floor_")
        figure = summarize(samples, moved if label in ("put_cold", "put") or label.startswith("get") else 0)
        if side == "floor":
            del figure["requests"]  # counted on vua_s3's store only
        report[side][label] = figure
    vua_r, floor_r = report["vua"], report["floor"]
    ratios = report["ratios"]
    ratios["put_vs_floor"] = vua_r["put_cold"]["gib_per_s"]["median"] / floor_r["put"]["gib_per_s"]["median"]
    for device in devices:
        ratios[f"get_{device}_vs_floor"] = (
            vua_r[f"get_{device}"]["gib_per_s"]["median"] / floor_r[f"get_{device}"]["gib_per_s"]["median"]
        )
    head = floor_r["head"]["seconds"]["median"]
    for kind in ("full", "half", "miss"):
        ratios[f"lookup_{kind}_vs_head"] = vua_r[f"lookup_{kind}"]["seconds"]["median"] / head
    ratios["put_stored_vs_head"] = vua_r["put_stored"]["seconds"]["median"] / head
    return report


async def _delete(store: S3Store, keys: list[str]) -> None:
    await gather_or_cancel(*(store.delete(k) for k in keys))
