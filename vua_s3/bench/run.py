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
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aioboto3
import torch

from ..config import DEFAULT_SPLIT_FACTOR, VUAConfig
from ..fragment import dtype_name
from ..logsafe import redact_url
from ..loop import BackgroundLoop, gather_or_cancel
from ..shapes import ModelShape
from ..storage.s3 import S3Settings, S3Store
from ..storage.s3.settings import crt_installed
from ..sync import VUA
from ..testing.moto import EMBEDDED_CREDENTIALS
from ..vua import ClosestKV
from .baseline import Floor, floor_get, floor_put
from .clients import CrtClient, TransferClient
from .posix import OriginalVUA, file_get, file_put
from .refresh import RefreshBench
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
    split_factor: int = DEFAULT_SPLIT_FACTOR
    batch: int = 1
    repeats: int = 5
    max_inflight: int | None = None
    url: str | None = None
    server: str = "auto"
    s3_options: dict[str, str] = field(default_factory=dict)
    progress: bool = False
    posix_dir: str | None = None
    """Where the POSIX rows run (a fresh directory is made inside); ``None``: /dev/shm, else the temp dir."""
    posix: bool = True
    cold: bool = True
    refresh: bool = False
    """Also a load with refreshes due beside one without (``bench/refresh.py``)."""


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
    from ..testing.local import local_s3

    server, description = local_s3(options.server)
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
    steps = options.repeats * (22 + len(devices) * 2 + 3 * options.refresh) + 1
    progress = _Progress(options.progress, steps)
    load_start = os.getloadavg()
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
                clients = _Clients(floor.store, session, loop)
                refresh = RefreshBench(cfg, url, session, loop, vua_options) if options.refresh else None
                try:
                    report = _measure(
                        vua, floor, clients, loop, counter, tokens, kv, devices, options, progress, url, refresh
                    )
                finally:
                    if refresh is not None:
                        refresh.close()
                    clients.close()
                    loop.run(floor.close())
                    loop.stop()
    finally:
        progress.close()
    report.update(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": describe_machine(),
            "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
                "payload_signing": store.settings.payload_signing,
                "max_inflight": vua.core.max_inflight,
            },
        }
    )
    return report


class _Clients:
    """The other S3 clients of the comparison, on the store's server and credentials."""

    def __init__(self, store: S3Store, session: aioboto3.Session, loop: BackgroundLoop) -> None:
        credentials = loop.run(_frozen_credentials(session))
        self.transfer = TransferClient(store, credentials)
        loop.run(store.head_many(["bench-connect"]))  # connects: resolves the bucket URL the C client needs
        self.crt = CrtClient(store, credentials) if crt_installed() and store.bucket_url else None

    def close(self) -> None:
        self.transfer.close()
        if self.crt is not None:
            self.crt.close()


async def _frozen_credentials(session: aioboto3.Session) -> Any:
    credentials = await session.get_credentials()
    if credentials is None:
        raise RuntimeError("no AWS credentials found for the bench")
    return await credentials.get_frozen_credentials()


def _measure(
    vua: VUA,
    floor: Floor,
    clients: _Clients,
    loop: BackgroundLoop,
    counter: _Meter,
    tokens: torch.Tensor,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    devices: list[str],
    options: BenchOptions,
    progress: _Progress,
    url: str,
    refresh: RefreshBench | None,
) -> dict[str, Any]:
    cfg = vua.config()
    batch, n = tokens.shape
    moved = options.shape.bytes_per_token * n * batch
    rows = list(tokens.unbind(0))
    forget = vua.forget_known  # measure as another process would: nothing known

    # Sizes and bodies of the floor's objects: the fragments vua_s3 writes.
    vua.put(tokens, kv, salt="sizes")
    heads = options.shape.kv_heads  # one object per group and KV head (format 2)
    keys = [k for row in rows for k in cfg.tokens_to_paths(row, salt="sizes", kv_heads=heads)]
    infos = loop.run(floor.store.head_many(keys))
    sizes = [info.size for info in infos if info is not None]
    assert len(sizes) == len(keys)
    payload = torch.randint(0, 256, (max(sizes),), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    whole = [payload[:size].numpy().tobytes() for size in sizes]
    bodies = [floor.prepare(body) for body in whole]
    reused = torch.empty(sum(sizes), dtype=torch.uint8)
    reused.fill_(0)  # faulted in once, before the clock
    progress.step("prepared")

    results: dict[str, list[Sample]] = {}

    def record(name: str, sample: Sample) -> None:
        results.setdefault(name, []).append(sample)
        progress.step(name)

    def timed(name: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        with counter.measure() as sample:
            out = fn(*args, **kwargs)
        record(name, sample)
        return out

    checks: dict[str, Any] = {}
    half = torch.cat([rows[0][: n // 2], rows[0][n // 2 :] + 1])
    # Three times the groups, the first third stored: a long prompt that starts with a stored one.
    longer = torch.cat([rows[0], torch.randint(0, 128_000, (2 * n,), generator=torch.Generator().manual_seed(3))])
    for rep in range(options.repeats):
        salt = f"r{rep}-{time.time_ns()}"
        floor_keys = [f"floor/{salt}/{i}" for i in range(len(sizes))]
        client_keys = [f"clients/{salt}/{i}" for i in range(len(sizes))]
        forget()
        checks["put_written"] = timed("put_cold", vua.put, tokens, kv, salt=salt)
        written = time.time()
        timed("floor_put", loop.run, floor_put(floor, floor_keys, bodies))
        timed("s3transfer_put", clients.transfer.put, client_keys, whole)
        if clients.crt is not None:
            timed("awscrt_put", clients.crt.put, client_keys, whole)
        forget()
        checks["reput_written"] = timed("put_stored", vua.put, tokens, kv, salt=salt)
        timed("put_stored_cached", vua.put, tokens, kv, salt=salt)
        for device in devices:
            forget()
            got: list[ClosestKV | None] = timed(f"get_{device}", vua.get_closest, rows, device, salt=salt)
            checks[f"get_{device}_tokens"] = sum(0 if g is None else g.tokens.numel() for g in got)
            del got
            timed(f"floor_get_{device}", loop.run, floor_get(floor, floor_keys, sizes))
        timed("s3transfer_get", clients.transfer.get, client_keys, sizes)
        if clients.crt is not None:
            timed("awscrt_get", clients.crt.get, client_keys, sizes)
            timed("awscrt_get_reused", clients.crt.get, client_keys, sizes, reused)
        timed("page_faults", _touch_fresh, sum(sizes))
        if options.cold:
            record("get_cold", _cold_get(url, cfg, rows[0], salt, options))
        for kind, query in (("full", rows[0]), ("half", half), ("miss", rows[0] + 1), ("long", longer)):
            forget()
            checks[f"lookup_{kind}"] = timed(f"lookup_{kind}", vua.lookup, query, salt=salt)
        group_heads = cfg.tokens_to_paths(rows[0], salt=salt, kv_heads=heads)[:heads]  # group 0's objects
        for _ in range(3):
            timed("floor_head", loop.run, floor.head(floor_keys[0]))
            timed("floor_list", loop.run, floor.list(group_heads))
        if refresh is not None:
            for name, sample in refresh.measure(rows, salt, written, rep).items():
                record(f"refresh_{name}", sample)
        loop.run(floor.delete(floor_keys + client_keys))
        loop.run(_delete(floor.store, [k for row in rows for k in cfg.tokens_to_paths(row, salt=salt, kv_heads=heads)]))
    posix_dir = _measure_posix(cfg, tokens, kv, whole, sizes, options, timed, record, checks) if options.posix else None

    report: dict[str, Any] = {"vua": {}, "floor": {}, "clients": {}, "posix": {}, "ratios": {}, "checks": checks}
    if refresh is not None:
        report["refresh"] = refresh.summary(groups=batch * (n // cfg.split_factor))
    for name, samples in results.items():
        section, label = _section(name)
        figure = summarize(samples, moved if _moves_data(label) else 0)
        if section not in ("vua", "refresh"):
            del figure["requests"]  # counted on vua_s3's store only
        target = report[section] if section in ("vua", "floor", "refresh") else report[section.split("/")[0]]
        if "/" in section:
            target = target.setdefault(section.split("/")[1], {})
        target[label] = figure
    report["ratios"] = _ratios(report, devices)
    report["transport"] = getattr(vua.store, "transport", "aiobotocore")
    if posix_dir is not None:
        report["posix_dir"] = posix_dir
    return report


def _section(name: str) -> tuple[str, str]:
    """Where a measurement goes in the report, and its label there."""
    for prefix, section in (
        ("floor_", "floor"),
        ("s3transfer_", "clients/s3transfer"),
        ("awscrt_", "clients/awscrt"),
        ("posixvua_", "posix/vua"),
        ("posixfloor_", "posix/floor"),
        ("original_", "posix/original"),
        ("refresh_", "refresh"),
    ):
        if name.startswith(prefix):
            return section, name.removeprefix(prefix)
    if name == "page_faults":
        return "floor", name
    return "vua", name


def _moves_data(label: str) -> bool:
    return label in ("put_cold", "put", "page_faults") or label.startswith("get")


def _ratios(report: dict[str, Any], devices: list[str]) -> dict[str, float]:
    vua_r, floor_r, clients, posix = report["vua"], report["floor"], report["clients"], report["posix"]

    def rate(figure: dict[str, Any]) -> float:
        return float(figure["gib_per_s"]["median"])

    ratios = {"put_vs_floor": rate(vua_r["put_cold"]) / rate(floor_r["put"])}
    for device in devices:
        ratios[f"get_{device}_vs_floor"] = rate(vua_r[f"get_{device}"]) / rate(floor_r[f"get_{device}"])
    for client, figures in clients.items():
        ratios[f"put_vs_{client}"] = rate(vua_r["put_cold"]) / rate(figures["put"])
        ratios[f"get_cpu_vs_{client}"] = rate(vua_r["get_cpu"]) / rate(figures["get"])
    head = floor_r["head"]["seconds"]["median"]
    for kind in ("full", "half", "miss", "long"):
        ratios[f"lookup_{kind}_vs_head"] = vua_r[f"lookup_{kind}"]["seconds"]["median"] / head
    ratios["put_stored_vs_head"] = vua_r["put_stored"]["seconds"]["median"] / head
    if "list" in floor_r:  # probes of multi-head groups are LISTs
        listing = floor_r["list"]["seconds"]["median"]
        for kind in ("full", "half", "miss", "long"):
            ratios[f"lookup_{kind}_vs_list"] = vua_r[f"lookup_{kind}"]["seconds"]["median"] / listing
    if "refresh" in report:
        due, off = report["refresh"]["get_due"], report["refresh"]["get_off"]
        ratios["get_refresh_due_vs_off"] = due["seconds"]["median"] / off["seconds"]["median"]
    if posix:
        for verb in ("put", "get"):
            ratios[f"posix_{verb}_vs_floor"] = rate(posix["vua"][verb]) / rate(posix["floor"][verb])
            ratios[f"posix_{verb}_vs_original"] = rate(posix["vua"][verb]) / rate(posix["original"][verb])
    return ratios


def _touch_fresh(size: int) -> None:
    """What fresh memory costs: a new buffer of ``size`` bytes, written once (page faults)."""
    torch.empty(size, dtype=torch.uint8).fill_(1)


def _cold_get(url: str, cfg: VUAConfig, row: torch.Tensor, salt: str, options: BenchOptions) -> Sample:
    """The first ``get_closest`` of a fresh process (see ``cold.py``)."""
    with tempfile.TemporaryDirectory(prefix="vua-s3-bench-") as tmp:
        torch.save(row.clone(), os.path.join(tmp, "tokens.pt"))
        spec = {
            "location": url,
            "split_factor": cfg.split_factor,
            "namespace": cfg.namespace,
            "salt": salt,
            "tokens": os.path.join(tmp, "tokens.pt"),
        }
        with open(os.path.join(tmp, "spec.json"), "w") as file:
            json.dump(spec, file)
        env = dict(os.environ)
        if not options.url:
            env.update({k.upper(): v for k, v in EMBEDDED_CREDENTIALS.items()})
        done = subprocess.run(
            [sys.executable, "-m", f"{__package__}.cold", os.path.join(tmp, "spec.json")],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=True,
        )
    figure = json.loads(done.stdout.strip().splitlines()[-1])
    if figure["tokens"] != row.numel():
        raise RuntimeError(f"the cold get found {figure['tokens']} of {row.numel()} tokens")
    return Sample(figure["seconds"], figure["cpu"], Counter())


def _measure_posix(
    cfg: VUAConfig,
    tokens: torch.Tensor,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    whole: list[bytes],
    sizes: list[int],
    options: BenchOptions,
    timed: Callable[..., Any],
    record: Callable[[str, Sample], None],
    checks: dict[str, Any],
) -> str:
    """vua_s3 on a POSIX directory beside the file floors and the original VUA, same KV;
    returns the directory the store's was made in."""
    parent = options.posix_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    root = tempfile.mkdtemp(prefix="vua-s3-bench-posix-", dir=parent)
    rows = list(tokens.unbind(0))
    try:
        floor_keys = [f"floor-{i}" for i in range(len(sizes))]
        with VUA(cfg, os.path.join(root, "vua")) as vua:
            for rep in range(options.repeats):
                salt = f"posix-r{rep}"
                original = OriginalVUA(os.path.join(root, f"original-{rep}"), cfg.split_factor)
                os.makedirs(os.path.join(root, f"original-{rep}"))
                vua.forget_known()
                timed("posixvua_put", vua.put, tokens, kv, salt=salt)
                timed("posixfloor_put", file_put, root, floor_keys, whole)
                timed("original_put", _original_put, original, rows, kv)
                vua.forget_known()
                got = timed("posixvua_get", vua.get_closest, rows, "cpu", salt=salt)
                checks["posix_get_tokens"] = sum(0 if g is None else g.tokens.numel() for g in got)
                del got
                timed("posixfloor_get", file_get, root, floor_keys, sizes)
                if options.cold:
                    record("posixvua_get_cold", _cold_get(os.path.join(root, "vua"), cfg, rows[0], salt, options))
                loaded = timed("original_get", _original_get, original, rows)
                checks["original_get_tokens"] = sum(x[0][0].size(2) if x else 0 for x in loaded)
                del loaded
                shutil.rmtree(os.path.join(root, f"original-{rep}"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return parent


def _original_put(original: OriginalVUA, rows: list[torch.Tensor], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for row, sequence in enumerate(rows):
        original.put(sequence, [(k[row : row + 1], v[row : row + 1]) for k, v in kv])


def _original_get(original: OriginalVUA, rows: list[torch.Tensor]) -> list[Any]:
    return [original.get_closest(row) for row in rows]


async def _delete(store: S3Store, keys: list[str]) -> None:
    await gather_or_cancel(*(store.delete(k) for k in keys))
