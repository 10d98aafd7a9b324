"""``vua-s3 bench``: vua_s3's figures beside the raw S3 transfer floor, measured in one run.

A KV store exists to beat prefill time, so what matters is its overhead over moving
the same bytes with plain S3 calls. For every figure the bench also moves the same
bytes, in the same number and size of objects, with plain aioboto3 calls (same
settings, concurrency and part size, bodies prepared before the clock starts, no
serialization), and prints vua_s3's figure beside that floor. Repeats interleave
vua_s3 and the floor so background load hits both alike; each figure is the median
of the repeats with their min and max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aioboto3
import torch

from .config import VUAConfig
from .embedded import EMBEDDED_CREDENTIALS
from .fragment import dtype_name
from .loop import BackgroundLoop, gather_or_cancel
from .s3 import S3Settings, S3Store
from .shapes import PRESETS, ModelShape
from .store import redact_url
from .vua import VUA, ClosestKV

_T = TypeVar("_T")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
GIB = float(1 << 30)


@dataclass
class Stat:
    """Median, min and max of one figure over the repeats."""

    median: float
    min: float
    max: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))


@dataclass
class Sample:
    """One timed run: wall seconds, client CPU seconds (all threads), requests by operation."""

    seconds: float
    cpu: float
    requests: Counter[str]


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
    from .seaweed import SeaweedS3, seaweed_available

    kind = options.server
    if kind == "auto":
        kind = "seaweedfs" if seaweed_available() else "moto"
    if kind == "seaweedfs":
        server: Any = SeaweedS3()
        description = "SeaweedFS (weed server, local, 127.0.0.1)"
    else:
        from .embedded import EmbeddedS3

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


class _Floor:
    """Plain aioboto3 calls moving the same objects with the store's own settings."""

    def __init__(self, store: S3Store, session: aioboto3.Session) -> None:
        self.store = store
        self.settings = store.settings
        self._session = session
        self._client: Any = None
        self._context: Any = None
        self._limit: asyncio.Semaphore | None = None

    async def open(self) -> None:
        s = self.settings
        self._context = self._session.client(
            "s3",
            endpoint_url=s.endpoint_url,
            region_name=s.region,
            verify=s.ca_bundle if s.ca_bundle and s.verify else s.verify,
            config=s.botocore_config(),
        )
        self._client = await self._context.__aenter__()
        self._limit = asyncio.Semaphore(s.concurrency)

    async def close(self) -> None:
        if self._context is not None:
            await self._context.__aexit__(None, None, None)
        await self.store.close()

    def _name(self, key: str) -> str:
        return f"{self.store.prefix}/{key}" if self.store.prefix else key

    async def _limited(self, request: Callable[[], Any]) -> Any:
        assert self._limit is not None
        async with self._limit:
            return await request()

    def prepare(self, body: bytes) -> list[bytes]:
        """The bodies of one object's requests, cut before the clock starts."""
        if len(body) <= self.settings.multipart_threshold:
            return [body]
        step = self.settings.part_size
        return [body[i : i + step] for i in range(0, len(body), step)]

    async def put(self, key: str, parts: list[bytes]) -> None:
        c, bucket, name = self._client, self.store.bucket, self._name(key)
        if len(parts) == 1:
            await self._limited(lambda: c.put_object(Bucket=bucket, Key=name, Body=parts[0]))
            return
        created = await self._limited(lambda: c.create_multipart_upload(Bucket=bucket, Key=name))
        upload_id = created["UploadId"]

        async def part(number: int, body: bytes) -> dict[str, Any]:
            r = await self._limited(
                lambda: c.upload_part(Bucket=bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=body)
            )
            return {"PartNumber": number, "ETag": r["ETag"]}

        done = await gather_or_cancel(*(part(n, b) for n, b in enumerate(parts, 1)))
        await self._limited(
            lambda: c.complete_multipart_upload(
                Bucket=bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
        )

    async def get(self, key: str, size: int) -> list[bytes]:
        c, bucket, name = self._client, self.store.bucket, self._name(key)

        async def read(**kwargs: Any) -> bytes:
            async def request() -> bytes:
                response = await c.get_object(Bucket=bucket, Key=name, **kwargs)
                async with response["Body"] as body:
                    return bytes(await body.read())

            return await self._limited(request)  # type: ignore[no-any-return]

        if size <= self.settings.multipart_threshold:
            return [await read()]
        step = self.settings.part_size
        return await gather_or_cancel(
            *(read(Range=f"bytes={i}-{min(i + step, size) - 1}") for i in range(0, size, step))
        )

    async def head(self, key: str) -> None:
        await self._limited(lambda: self._client.head_object(Bucket=self.store.bucket, Key=self._name(key)))

    async def delete(self, keys: Sequence[str]) -> None:
        async def delete(key: str) -> None:
            await self._limited(lambda: self._client.delete_object(Bucket=self.store.bucket, Key=self._name(key)))

        await gather_or_cancel(*(delete(key) for key in keys))


def _figure(samples: list[Sample], moved: int) -> dict[str, Any]:
    figure: dict[str, Any] = {"seconds": asdict(Stat.of([s.seconds for s in samples]))}
    if moved:
        figure["gib_per_s"] = asdict(Stat.of([moved / GIB / s.seconds for s in samples]))
        figure["cpu_s_per_gib"] = asdict(Stat.of([s.cpu / (moved / GIB) for s in samples]))
    figure["requests"] = dict(samples[-1].requests)
    return figure


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
            floor = _Floor(S3Store.from_url(url, session=session), session)
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
            "machine": _describe_machine(),
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


def _describe_machine() -> str:
    from .cli import describe_machine

    return describe_machine()


def _measure(
    vua: VUA,
    floor: _Floor,
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
    keys = [k for row in rows for k in cfg.tokens_to_paths(row, salt="sizes")]
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
        timed("floor_put", loop.run, _floor_put(floor, floor_keys, bodies))
        forget()
        checks["reput_written"] = timed("put_stored", vua.put, tokens, kv, salt=salt)
        timed("put_stored_cached", vua.put, tokens, kv, salt=salt)
        for device in devices:
            forget()
            got: list[ClosestKV | None] = timed(f"get_{device}", vua.get_closest, rows, device, salt=salt)
            checks[f"get_{device}_tokens"] = sum(0 if g is None else g.tokens.numel() for g in got)
            del got
            timed(f"floor_get_{device}", loop.run, _floor_get(floor, floor_keys, sizes))
        for kind, query in (("full", rows[0]), ("half", half), ("miss", rows[0] + 1)):
            forget()
            checks[f"lookup_{kind}"] = timed(f"lookup_{kind}", vua.lookup, query, salt=salt)
        for _ in range(3):
            timed("floor_head", loop.run, floor.head(floor_keys[0]))
        loop.run(floor.delete(floor_keys))
        loop.run(_delete(floor.store, [k for row in rows for k in cfg.tokens_to_paths(row, salt=salt)]))

    report: dict[str, Any] = {"vua": {}, "floor": {}, "ratios": {}, "checks": checks}
    for name, samples in results.items():
        side = "floor" if name.startswith("floor_") else "vua"
        label = name.removeprefix("floor_")
        figure = _figure(samples, moved if label in ("put_cold", "put") or label.startswith("get") else 0)
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


async def _floor_put(floor: _Floor, keys: list[str], bodies: list[list[bytes]]) -> None:
    await gather_or_cancel(*(floor.put(k, b) for k, b in zip(keys, bodies, strict=True)))


async def _floor_get(floor: _Floor, keys: list[str], sizes: list[int]) -> None:
    await gather_or_cancel(*(floor.get(k, s) for k, s in zip(keys, sizes, strict=True)))


async def _delete(store: S3Store, keys: list[str]) -> None:
    await gather_or_cancel(*(store.delete(k) for k in keys))


def _rate(figure: dict[str, Any]) -> str:
    s = {k: v * 1024 for k, v in figure["gib_per_s"].items() if k != "samples"}
    return f"{s['median']:.1f} MiB/s [{s['min']:.1f}-{s['max']:.1f}]"


def _latency(figure: dict[str, Any]) -> str:
    s = figure["seconds"]
    return f"{s['median'] * 1e3:.1f} ms [{s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f}]"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table: each vua_s3 figure beside its floor and their ratio."""
    shape = report["shape"]
    settings = report["settings"]
    lines = [
        f"vua-s3 bench, {report['date']}",
        f"machine: {report['machine']}",
        f"server: {report['server']}",
        f"shape: {shape['name']} ({shape['layers']} layers, {shape['kv_heads']} KV heads, head_dim "
        f"{shape['head_dim']}, {shape['dtype']}); {report['tokens']} tokens x batch {report['batch']}, split factor "
        f"{report['split_factor']}: {report['groups']} objects, {report['bytes_moved'] / GIB:.3f} GiB of KV",
        "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        f"median of {report['repeats']} repeats [min-max]; client CPU is this process, all threads",
        "",
        f"{'operation':<22}{'vua_s3':>34}{'floor (plain aioboto3)':>34}{'ratio':>8}{'CPU s/GiB vua/floor':>22}",
    ]
    vua_r, floor_r, ratios = report["vua"], report["floor"], report["ratios"]
    pairs = [("put (cold)", "put_cold", "put", "put_vs_floor")]
    pairs += [(f"get_closest -> {d}", f"get_{d}", f"get_{d}", f"get_{d}_vs_floor") for d in ("cpu", "cuda")]
    for label, mine, base, ratio in pairs:
        if mine not in vua_r:
            continue
        cpu = f"{vua_r[mine]['cpu_s_per_gib']['median']:.2f}/{floor_r[base]['cpu_s_per_gib']['median']:.2f}"
        lines.append(f"{label:<22}{_rate(vua_r[mine]):>34}{_rate(floor_r[base]):>34}{ratios[ratio]:>7.2f}x{cpu:>22}")
    head = _latency(floor_r["head"])
    for label, mine, ratio in [
        ("put (already stored)", "put_stored", "put_stored_vs_head"),
        ("lookup (full hit)", "lookup_full", "lookup_full_vs_head"),
        ("lookup (half hit)", "lookup_half", "lookup_half_vs_head"),
        ("lookup (miss)", "lookup_miss", "lookup_miss_vs_head"),
    ]:
        requests = ", ".join(f"{v} {k}" for k, v in sorted(vua_r[mine]["requests"].items())) or "no requests"
        floor_text = head + " (1 HEAD)"
        lines.append(f"{label:<22}{_latency(vua_r[mine]):>34}{floor_text:>34}{ratios[ratio]:>7.2f}x  {requests}")
    cached = vua_r["put_stored_cached"]
    requests = ", ".join(f"{v} {k}" for k, v in sorted(cached["requests"].items())) or "no requests"
    lines.append(f"{'put (stored, cached)':<22}{_latency(cached):>34}{'':>34}{'':>8}  {requests}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="s3://bucket/prefix?... to measure (default: a local server started here)")
    p.add_argument(
        "--server",
        choices=["auto", "seaweedfs", "moto"],
        default="auto",
        help="local server when no --url: SeaweedFS if installed (auto), else embedded moto",
    )
    p.add_argument("--model", choices=sorted(PRESETS), default="llama3-8b", help="KV shape preset")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--kv-heads", type=int, help="override the preset's KV heads")
    p.add_argument("--head-dim", type=int, help="override the preset's head_dim")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="override the preset's dtype")
    p.add_argument("--tokens", type=int, default=4096, help="prompt length (trimmed to the split factor)")
    p.add_argument("--split-factor", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="sequences per put")
    p.add_argument("--concurrency", type=int, help="S3 requests in flight (the URL's concurrency setting)")
    p.add_argument("--part-size", help="S3 part and range size, e.g. 16MiB")
    p.add_argument("--multipart-threshold", help="objects above this go in parts, e.g. 64MiB")
    p.add_argument("--max-inflight", type=int, help="fragments encoded or decoded at once (AsyncVUA max_inflight)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the report as JSON, nothing else")


def bench(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand."""
    preset = PRESETS[args.model]
    shape = ModelShape(
        preset.name if not any((args.layers, args.kv_heads, args.head_dim, args.dtype)) else "custom",
        layers=args.layers or preset.layers,
        kv_heads=args.kv_heads or preset.kv_heads,
        head_dim=args.head_dim or preset.head_dim,
        dtype=_DTYPES[args.dtype] if args.dtype else preset.dtype,
    )
    s3_options = {
        name: str(value)
        for name, value in (
            ("concurrency", args.concurrency),
            ("part_size", args.part_size),
            ("multipart_threshold", args.multipart_threshold),
        )
        if value is not None
    }
    options = BenchOptions(
        shape=shape,
        tokens=args.tokens,
        split_factor=args.split_factor,
        batch=args.batch,
        repeats=args.repeats,
        max_inflight=args.max_inflight,
        url=args.url,
        server=args.server,
        s3_options=s3_options,
        progress=not args.json and sys.stderr.isatty(),
    )
    report = run_bench(options)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if _checks_pass(report) else 1


def _checks_pass(report: dict[str, Any]) -> bool:
    """The bench's own sanity: everything found, nothing rewritten."""
    checks = report["checks"]
    full = report["tokens"] * report["batch"]
    ok = checks["put_written"] == report["groups"] and checks["reput_written"] == 0
    ok &= all(checks[k] == full for k in checks if k.startswith("get_"))
    ok &= checks["lookup_full"] == report["tokens"] and checks["lookup_miss"] == 0
    split = report["split_factor"]
    ok &= checks["lookup_half"] == report["tokens"] // 2 // split * split
    if not ok:
        print(f"vua-s3 bench: sanity checks failed: {checks}", file=sys.stderr)
    return bool(ok)


__all__ = ["BenchOptions", "add_arguments", "bench", "format_report", "run_bench"]
