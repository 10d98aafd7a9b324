"""``vua-s3 bench-vllm``: ``vllm serve`` with and without the VUAS3Connector, over HTTP.

Each server is one ``vllm serve`` process on a random Llama written here, driven by concurrent
streaming ``/v1/completions`` clients. Scenarios, each ``repeats`` runs on new prompts:

* ``none``: no connector;
* ``empty``: the connector on an empty store (it stores every document);
* ``warm``: another server process on the store ``empty`` filled;
* ``slow`` (reported as ``warm+<N>ms``): a third one on that store, every store request held
  ``N`` ms by a proxy;
* ``same-prefix``: many clients at once on each new document (uploads per group);
* ``same-prefix-warm``: the same on the ``warm`` server, whose store holds those documents and
  whose own prefix cache does not (loads per group);
* ``hot``: on the ``warm`` server, every prompt after one stored system prompt (store requests
  per prompt).

The servers run in turn: ``none``, the filling one (``empty``, ``same-prefix``), the reading
one (``warm``, ``same-prefix-warm``, ``hot``), the slow one. A reading scenario whose prompts
no chosen scenario stores has them stored first, unmeasured, by the filling server. On S3 every
connector server reaches the store through a proxy on 127.0.0.1 that counts what the store is
asked (the slow one's also holds each request); on ``posix`` (a directory in the work dir)
nothing stands between. Per run: TTFT percentiles, output tokens/s, requests/s, the connector's
counters (``/metrics``), the store's requests, the server's CPU seconds, the store side's CPU
seconds (S3 server and proxy: another machine's in a deployment, this one's here), the load
average before and after, and every request's TTFT.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..config import DEFAULT_SPLIT_FACTOR
from ..testing.faultproxy import Fault, FaultProxy
from ..testing.moto import EmbeddedS3
from ..testing.seaweed import SeaweedS3, seaweed_available
from .cpu_hog import cpu_hogs
from .random_llama import write_model
from .report import describe_machine
from .serving import DEFAULT_VLLM_VENV, Server, Workload, process_tree_cpu, serve, vllm_python
from .serving_report import summarize
from .serving_traffic import traffic
from .serving_workloads import PromptShape, hot, regular, same_prefix

SCENARIOS = ("none", "empty", "warm", "slow", "same-prefix", "same-prefix-warm", "hot")
_SERVERS = ("none", "fill", "read", "slow")


@dataclass(frozen=True)
class _Scenario:
    server: str
    """Which server runs it: none (no connector), fill, read (a process that never stored), slow."""
    workload: str
    needs: str | None = None
    """The scenario whose prompts must be stored before it runs."""


_PLAN = {
    "none": _Scenario("none", "regular"),
    "empty": _Scenario("fill", "regular"),
    "warm": _Scenario("read", "regular", "empty"),
    "slow": _Scenario("slow", "regular", "empty"),
    "same-prefix": _Scenario("fill", "same-prefix"),
    "same-prefix-warm": _Scenario("read", "same-prefix", "same-prefix"),
    "hot": _Scenario("read", "hot", "hot-prime"),
}


@dataclass(frozen=True)
class ServeBenchOptions:
    workload: str = "documents"
    """``documents`` (shared documents, distinct questions) or ``chat`` (multi-round)."""
    docs: int = 4
    doc_tokens: int = 1024
    questions: int = 4
    """Questions per document, or rounds per conversation."""
    question_tokens: int = 32
    max_tokens: int = 16
    concurrency: int = 4
    layers: int = 4
    hidden: int = 512
    split_factor: int = DEFAULT_SPLIT_FACTOR
    latency_ms: float = 20.0
    repeats: int = 3
    scenarios: tuple[str, ...] = SCENARIOS
    cpu_hog: int = 0
    """Busy-loop processes running beside the bench (a loaded machine)."""
    store: str = "auto"
    """``seaweed``, ``moto``, ``posix``, or ``auto`` (SeaweedFS when installed)."""
    vllm_venv: Path = DEFAULT_VLLM_VENV
    work_dir: Path | None = None
    """Where the checkpoint and the server logs go (default: a new temporary directory)."""

    def shape(self) -> PromptShape:
        names = {f.name for f in fields(PromptShape)}
        given = {k: v for k, v in asdict(self).items() if k in names}
        return PromptShape(**given, reply_tokens=self.max_tokens)

    def label(self, scenario: str) -> str:
        """The scenario's name in the report."""
        return f"warm+{self.latency_ms:g}ms" if scenario == "slow" else scenario


def _workload(kind: str, shape: PromptShape, seed: int) -> Workload:
    if kind == "regular":
        return regular(shape, seed)
    if kind == "same-prefix":
        return same_prefix(shape, seed)
    if kind == "hot":
        return hot(shape, seed)[0]
    if kind == "hot-prime":
        return hot(shape, seed)[1]
    raise ValueError(f"unknown workload {kind!r}")


def server_order(chosen: tuple[str, ...]) -> list[tuple[str, list[str], list[str]]]:
    """Per server to start, in turn: its measured scenarios and the workloads it stores unmeasured."""
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        raise ValueError(f"unknown scenarios {unknown}: choose from {', '.join(SCENARIOS)}")
    primes = []
    for name in SCENARIOS:
        needs = _PLAN[name].needs
        if name in chosen and needs is not None and needs not in chosen and needs not in primes:
            primes.append(needs)
    order = []
    for server in _SERVERS:
        measured = [n for n in SCENARIOS if n in chosen and _PLAN[n].server == server]
        stored = [_PLAN[p].workload if p in _PLAN else p for p in primes] if server == "fill" else []
        if measured or stored:
            order.append((server, measured, stored))
    return order


def run_serve_bench(options: ServeBenchOptions) -> dict[str, Any]:
    """Every chosen scenario, ``options.repeats`` runs each; the report (all figures, JSON-able)."""
    order = server_order(options.scenarios)
    store_kind = options.store if options.store != "auto" else ("seaweed" if seaweed_available() else "moto")
    if store_kind == "posix" and "slow" in options.scenarios:
        raise ValueError("the slow scenario holds S3 requests in a proxy: run it with --store seaweed or moto")
    python = vllm_python(options.vllm_venv)
    shape = options.shape()
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="vua-bench-vllm-"))
    model = work / "model"
    write_model(model, options.layers, options.hidden)
    runs: dict[str, list[dict[str, Any]]] = {}
    load_start = list(os.getloadavg())
    with cpu_hogs(options.cpu_hog), _routes(store_kind, work, options.latency_ms) as routes:
        for server, measured, stored in order:
            route = routes.get(server)
            url = None if route is None else route.url
            with serve(python, model, url, work / f"{server}.log", split_factor=options.split_factor) as running:
                for name in measured:
                    kind = _PLAN[name].workload
                    runs[name] = [_run(running, route, _workload(kind, shape, r), str(model), options)
                                  for r in range(options.repeats)]  # fmt: skip
                for kind in stored:
                    for r in range(options.repeats):
                        _run(running, route, _workload(kind, shape, r), str(model), options)
    scenarios, per_request = {}, {}
    for name in SCENARIOS:
        if name in runs:
            label = options.label(name)
            per_request[label] = [run.pop("per_request") for run in runs[name]]
            scenarios[label] = {"runs": runs[name], "summary": summarize(runs[name])}
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "store": store_kind,
        "machine": describe_machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_start,
        "load_average": list(os.getloadavg()),
        "scenarios": scenarios,
        "per_request": per_request,
    }


@dataclass(frozen=True)
class _Route:
    """How a connector server reaches the store: its URL, the proxy counting its requests, and
    the S3 server's pid (None where its CPU cannot be told apart: moto runs in this process)."""

    url: str
    proxy: FaultProxy | None = None
    server_pid: int | None = None

    def store_side_cpu(self) -> float | None:
        """CPU seconds so far of what serves the store here (the proxy and the S3 server)."""
        if self.proxy is None or self.server_pid is None:
            return None
        return self.proxy.cpu_seconds() + process_tree_cpu(self.server_pid)


def _run(server: Server, route: _Route | None, workload: Workload, model: str, o: ServeBenchOptions) -> dict[str, Any]:
    """One measured run, with the store's requests during it (none without a connector) and
    the CPU the store side spent on them."""
    proxy = route.proxy if route is not None else None
    first = len(proxy.requests) if proxy is not None else 0
    cpu_before = route.store_side_cpu() if route is not None else None
    run = server.run(workload, model, o.concurrency, o.max_tokens)
    cpu_after = route.store_side_cpu() if route is not None else None
    run["store_side_cpu_s"] = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    if proxy is not None:
        run["traffic"] = traffic(proxy.requests[first:], run["requests"])
    return run


@contextlib.contextmanager
def _routes(kind: str, work: Path, latency_ms: float) -> Iterator[dict[str, _Route]]:
    """Per connector server, how it reaches a new prefix of the store: on S3 through a counting
    proxy (the slow server's holds every request ``latency_ms``), on posix straight to files."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    if kind == "posix":
        url = (work / "store" / prefix).resolve().as_uri()
        yield {"fill": _Route(url), "read": _Route(url)}
        return
    if kind not in ("seaweed", "moto"):
        raise ValueError(f"unknown store {kind!r}: seaweed, moto, posix or auto")
    with (
        SeaweedS3() if kind == "seaweed" else EmbeddedS3() as s3,
        FaultProxy(s3.port) as counted,
        FaultProxy(s3.port) as slow,
    ):
        slow.faults.append(Fault("delay", delay=latency_ms / 1000))
        direct = s3.url(prefix)
        pid = s3.pid if isinstance(s3, SeaweedS3) else None
        yield {
            name: _Route(direct.replace(s3.endpoint_url, proxy.endpoint_url), proxy, pid)
            for name, proxy in (("fill", counted), ("read", counted), ("slow", slow))
        }
