"""One vLLM engine (TP 1 or 2) on moto through a fault proxy: what it counted, published
and freed, beside what the store saw; reports JSON.

Runs in the vLLM venv, one fresh process; everything under ``__main__`` (TP=2 spawns its
workers). The proxy runs in this process and counts every request. Phases:

* ``store``: two new prompts (two groups each), then a short prompt that only drives a
  step once the store holds every upload (the workers report them at a step);
* ``load``: the local prefix cache reset, the first prompt again (loaded from the store);
* ``abort``: the local prefix cache reset, the second prompt with its object GETs held:
  aborted once a GET is held, then the engine is stepped until the scheduler holds no
  request (or 300 steps), all before the held GETs are released;
* ``reset``: ``reset_prefix_cache(reset_connector=True)``, then the first prompt again
  (stored again, in the new epoch);
* the metrics (``LLM.get_metrics()``) and every KV event of the engine's ZMQ stream.

    python connector_run.py MODEL_DIR MOTO_PORT BUCKET PREFIX PROMPTS_JSON OUT_JSON --tp N
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from vua_s3.testing.faultproxy import Fault, FaultProxy

SPLIT = 64


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model", "moto_port", "bucket", "prefix", "prompts", "out"):
        parser.add_argument(name)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.tp)))
    import msgspec
    import zmq
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_events import KVEventBatch
    from vllm.inputs import TokensPrompt

    p1, p2, short = json.loads(Path(args.prompts).read_text())
    proxy = FaultProxy(int(args.moto_port)).start()
    url = (
        f"s3://{args.bucket}/{args.prefix}?endpoint_url={proxy.endpoint_url}&region=us-east-1"
        "&addressing=path&max_attempts=1"
    )
    # An ipc endpoint: vLLM's publisher binds it (a tcp one with a host it connects to,
    # and one with a wildcard host would listen on every interface).
    endpoint = f"ipc://{Path(args.out).with_suffix('.events')}"
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    options: dict[str, Any] = {"distributed_executor_backend": "mp"} if args.tp > 1 else {}
    llm = LLM(
        model=args.model, skip_tokenizer_init=True, dtype="float32", block_size=32, max_model_len=1024,
        enforce_eager=True, enable_prefix_caching=True, kv_cache_memory_bytes=64 << 20, seed=0,
        disable_log_stats=False, tensor_parallel_size=args.tp,
        kv_events_config={"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint},
        kv_transfer_config={"kv_connector": "VUAS3Connector", "kv_role": "kv_both",
                            "kv_connector_module_path": "vua_s3.integrations.vllm",
                            "kv_connector_extra_config": {"url": url, "split_factor": SPLIT,
                                                          "load_timeout_s": 600.0}},
        **options,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    report: dict[str, Any] = {}

    def run(prompts: list[list[int]]) -> list[dict[str, Any]]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [{"tokens": list(o.outputs[0].token_ids), "kv_transfer_params": o.kv_transfer_params} for o in outs]

    def count(method: str, listing: bool = False) -> int:
        """Requests for fragments (the identity manifest's aside)."""
        where = f"prefix={args.prefix}" if listing else f"/{args.prefix}/"
        return sum(
            1
            for r in proxy.requests
            if r.method == method
            and ("list-type=2" in r.query) == listing
            and where in (r.query if listing else r.path)
            and "identity-" not in r.path
        )

    def puts_done() -> int:
        return sum(1 for r in proxy.requests if r.method == "PUT" and r.status == 200 and "identity-" not in r.path)

    def wait_for_puts(n: int) -> None:
        deadline = time.monotonic() + 120
        while puts_done() < n and time.monotonic() < deadline:
            time.sleep(0.05)

    # store
    report["store"] = run([p1, p2])
    wait_for_puts(2 * 2 * 2)  # two prompts, two groups, two KV heads
    run([short])  # a step to carry the workers' reports

    # load
    llm.reset_prefix_cache()
    report["load"] = run([p1])
    report["gets"] = count("GET")

    # abort
    llm.reset_prefix_cache()
    proxy.faults = [Fault("delay", method="GET", query_contains="list-type=2"), Fault("hold", method="GET")]
    engine.add_request("aborted", TokensPrompt(prompt_token_ids=p2), params)
    steps = 0
    while not proxy.held.is_set() and steps < 3000:
        engine.step()
        steps += 1
        time.sleep(0.005)
    engine.abort_request(["aborted"])
    after = 0
    while scheduler.requests and after < 300:
        engine.step()
        after += 1
        time.sleep(0.01)
    report["abort"] = {
        "held": proxy.held.is_set(),
        "freed": not scheduler.requests,
        "steps_after_abort": after,
        "usage": scheduler.kv_cache_manager.usage,
    }
    proxy.faults = []
    proxy.release()

    # reset
    llm.reset_prefix_cache(reset_connector=True)
    report["reset"] = run([p1])
    wait_for_puts(3 * 2 * 2)  # and its two groups again, in the new epoch
    run([short])
    report["puts"], report["lists"], report["heads"] = puts_done(), count("GET", listing=True), count("HEAD")
    report["metrics"] = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if "vua_s3" in m.name}
    engine.engine_core.shutdown()

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    events = []
    while sub.poll(2000):
        _topic, _seq, payload = sub.recv_multipart()
        for event in decoder.decode(payload).events:
            data = msgspec.structs.asdict(event)
            data["type"] = type(event).__name__
            data["block_hashes"] = [str(h) for h in data.get("block_hashes") or ()]
            if data.get("parent_block_hash") is not None:
                data["parent_block_hash"] = str(data["parent_block_hash"])
            data.pop("extra_keys", None)
            events.append(data)
    report["events"] = events
    proxy.stop()
    Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
