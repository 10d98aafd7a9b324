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
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aioboto3
import torch

from ..config import DEFAULT_SPLIT_FACTOR, VUAConfig
from ..fragment import dtype_name
from ..logsafe import redact_url
from ..loop import BackgroundLoop
from ..shapes import ModelShape
from ..storage.s3 import S3Settings, S3Store
from ..storage.s3.settings import crt_installed
from ..sync import VUA
from ..testing.moto import EMBEDDED_CREDENTIALS
from ..vua import AsyncVUA
from .baseline import Floor
from .clients import CrtClient, TransferClient
from .figures import ratios, sections
from .long import measure_long
from .posix import measure_posix
from .refresh import RefreshBench
from .report import Sample, describe_machine
from .s3rows import measure_s3
from .server import ServerCpu
from .session import Meter, Session


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
    long_tokens: int | None = None
    """Also measure one prompt of this many tokens (``long.py``), ``long_repeats`` times."""
    long_repeats: int = 2
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
def _server(options: BenchOptions) -> Iterator[tuple[str, aioboto3.Session, str, int | None]]:
    """(URL, session, description, server pid where local) of the server to measure: the
    given URL or one started here."""
    if options.url:
        settings = S3Settings.from_query(urlsplit(options.url).query)
        where = redact_url(options.url).split("?")[0]
        yield options.url, aioboto3.Session(profile_name=settings.profile), where, None
        return
    from ..testing.local import local_s3
    from ..testing.seaweed import SeaweedS3

    server, description = local_s3(options.server)
    with server:
        pid = server.pid if isinstance(server, SeaweedS3) else None  # moto runs in this process
        yield server.url(f"bench-{int(time.time())}"), aioboto3.Session(**EMBEDDED_CREDENTIALS), description, pid


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
    steps = options.repeats * (27 + len(devices) * 2 + 3 * options.refresh) + 1
    progress = _Progress(options.progress, steps)
    load_start = os.getloadavg()
    vua_options: dict[str, Any] = {} if options.max_inflight is None else {"max_inflight": options.max_inflight}
    try:
        with _server(options) as (url, session, where, pid):
            url = _with_options(url, options.s3_options)
            store = S3Store.from_url(url, session=session)
            loop = BackgroundLoop("vua-s3-bench-floor")
            floor = Floor(S3Store.from_url(url, session=session), session)
            side = AsyncVUA(cfg, S3Store.from_url(url, session=session), **vua_options)
            with VUA(cfg, store, **vua_options) as vua:
                loop.run(floor.open())
                credentials = loop.run(_frozen_credentials(session))
                loop.run(floor.store.head_many(["bench-connect"]))  # resolves the bucket URL the C client needs
                crt = CrtClient(floor.store, credentials) if crt_installed() and floor.store.bucket_url else None
                refresh = RefreshBench(cfg, url, session, loop, vua_options) if options.refresh else None
                run = Session(
                    vua, side, floor, TransferClient(floor.store, credentials), crt, loop,
                    Meter(store, ServerCpu.of(pid)), progress.step, refresh,
                )  # fmt: skip
                try:
                    report = _measure(run, tokens, kv, devices, options, url)
                finally:
                    if refresh is not None:
                        refresh.close()
                    run.transfer.close()
                    if crt is not None:
                        crt.close()
                    loop.run(side.close())
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
            "server_cpu": "measured" if pid is not None else "not measured (not a local server process)",
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


def _measure(
    run: Session,
    tokens: torch.Tensor,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    devices: list[str],
    options: BenchOptions,
    url: str,
) -> dict[str, Any]:
    cfg = run.vua.config()
    batch, n = tokens.shape
    per_row = options.shape.bytes_per_token * n
    rows = list(tokens.unbind(0))

    def cold(location: str) -> Any:
        return lambda row, salt: _cold_get(location, cfg, row, salt, options)

    sizes = measure_s3(run, options.shape, tokens, kv, devices, options.repeats, cold(url) if options.cold else None)
    posix_dir = None
    if options.posix:
        whole = [bytes(size) for size in sizes]
        posix_cold = (lambda location, salt: _cold_get(location, cfg, rows[0], salt, options)) if options.cold else None
        where = (options.posix_dir, options.repeats)
        posix_dir, colds = measure_posix(cfg, tokens, kv, whole, sizes, where, run.timed, posix_cold, run.checks)
        for sample in colds:
            run.record("posixvua_get_cold", sample)
    report = sections(run.results, per_row * batch, per_row)
    report["checks"] = run.checks
    if run.refresh is not None:
        report["refresh"].update(run.refresh.summary(groups=batch * (n // cfg.split_factor)))
    report["ratios"] = ratios(report, devices)
    report["transport"] = getattr(run.vua.store, "transport", "aiobotocore")
    if posix_dir is not None:
        report["posix_dir"] = posix_dir
    if options.long_tokens:
        report["long"] = measure_long(run, options.shape, options.long_tokens, options.long_repeats)
    return report


async def _frozen_credentials(session: aioboto3.Session) -> Any:
    credentials = await session.get_credentials()
    if credentials is None:
        raise RuntimeError("no AWS credentials found for the bench")
    return await credentials.get_frozen_credentials()


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
