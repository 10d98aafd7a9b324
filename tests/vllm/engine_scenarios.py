"""One vLLM engine, with prefix caching on, meets the store through a fault proxy; reports JSON.

Runs in the vLLM venv (one fresh process; the test's moto server holds prompts an
earlier engine stored). The proxy (``vua_s3.testing.faultproxy``) runs in this process, so
each phase can slow, hold or count the store's requests without another process:

* ``delay``: 8 new prompts with a fast store, then 8 more with every store response
  held back 0.5 s: the seconds each took, and the requests the slow phase sent.
* ``partial``: prompt R shares 96 tokens with stored prompt X0; then X0 itself, whose
  first 96 tokens are in the local prefix cache by then: the store requests each made.
* ``corrupt``: stored prompt X1 (group 1 overwritten with garbage by the test).
* ``embeds``: a ``prompt_embeds`` request; the store requests it made.
* ``hung``: request A decodes while probes (HEADs and LISTs) are held (never answered); request B arrives:
  A's token count after every step until B is done, then request C (breaker open).
* ``metrics``: ``LLM.get_metrics()``'s ``vllm:vua_s3_*`` values.

    python engine_scenarios.py MODEL_DIR MOTO_PORT BUCKET PREFIX PROMPTS_JSON OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from vua_s3.testing.faultproxy import Fault, FaultProxy

SPLIT = 64
REGION = "us-east-1"


def main() -> None:
    model, moto_port, bucket, prefix, prompts_path, out_path = sys.argv[1:7]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    stored = json.loads(Path(prompts_path).read_text())
    proxy = FaultProxy(int(moto_port)).start()
    url = f"s3://{bucket}/{prefix}?endpoint_url={proxy.endpoint_url}&region={REGION}&addressing=path&max_attempts=1"
    extra = {"url": url, "split_factor": SPLIT, "lookup_timeout_s": 2.0, "breaker_backoff_s": 600.0}
    llm = LLM(
        model=model, skip_tokenizer_init=True, dtype="float32", block_size=32, max_model_len=1024,
        enforce_eager=True, enable_prefix_caching=True, kv_cache_memory_bytes=64 << 20, seed=0,
        enable_prompt_embeds=True, disable_log_stats=False,
        kv_transfer_config={"kv_connector": "VUAS3Connector", "kv_role": "kv_both",
                            "kv_connector_module_path": "vua_s3.integrations.vllm",
                            "kv_connector_extra_config": extra},
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    gen = torch.Generator().manual_seed(11)
    report: dict[str, Any] = {}

    def fresh(n: int, length: int = 150) -> list[list[int]]:
        return [torch.randint(3, 512, (length,), generator=gen).tolist() for _ in range(n)]

    def run(prompts: list[Any]) -> list[dict[str, Any]]:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [{"tokens": list(o.outputs[0].token_ids), "num_cached_tokens": o.num_cached_tokens,
                 "kv_transfer_params": o.kv_transfer_params} for o in outs]  # fmt: skip

    def requests_since(mark: int) -> list[list[str]]:
        quiet(mark)
        return [[r.method, r.path, r.query] for r in proxy.requests[mark:]]

    def quiet(mark: int) -> None:
        """Wait until the proxy saw no request for 1 s (uploads run behind the engine)."""
        seen, since = len(proxy.requests), time.monotonic()
        while time.monotonic() - since < 1.0:
            time.sleep(0.1)
            if len(proxy.requests) != seen:
                seen, since = len(proxy.requests), time.monotonic()

    def tokens(ids: list[int]) -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=ids)]

    # delay
    run([TokensPrompt(prompt_token_ids=p) for p in fresh(2)])  # warm up the engine's code paths
    quiet(0)
    started = time.perf_counter()
    run([TokensPrompt(prompt_token_ids=p) for p in fresh(8)])
    fast = time.perf_counter() - started
    quiet(0)
    mark = len(proxy.requests)
    proxy.faults = [Fault("delay", delay=0.5)]
    started = time.perf_counter()
    run([TokensPrompt(prompt_token_ids=p) for p in fresh(8)])
    slow = time.perf_counter() - started
    report["delay"] = {"fast_s": fast, "slow_s": slow, "requests": requests_since(mark)}
    proxy.faults = []

    # partial local hit
    x0, x1 = stored[0], stored[1]
    r = x0[:96] + fresh(1, 60)[0]
    mark = len(proxy.requests)
    report["partial_r"] = {"out": run(tokens(r)), "requests": requests_since(mark)}
    mark = len(proxy.requests)
    report["partial_x0"] = {"out": run(tokens(x0)), "requests": requests_since(mark)}

    # corrupt group 1 of X1 (the test overwrote it)
    mark = len(proxy.requests)
    report["corrupt"] = {"out": run(tokens(x1)), "requests": requests_since(mark)}

    # prompt_embeds
    mark = len(proxy.requests)
    embeds = torch.randn(150, 256, generator=gen)
    out = llm.generate([{"prompt_embeds": embeds}], params, use_tqdm=False)
    report["embeds"] = {"tokens": len(out[0].outputs[0].token_ids), "requests": requests_since(mark)}

    # metrics, before the breaker opens
    report["metrics"] = {
        m.name: getattr(m, "value", None) for m in llm.get_metrics() if m.name.startswith("vllm:vua_s3_")
    }

    # hung: probes are held; A keeps decoding while B's lookup hangs
    engine = llm.llm_engine
    decode = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    a, b, c = fresh(3)
    engine.add_request("A", TokensPrompt(prompt_token_ids=a), decode)
    counts: dict[str, int] = {"A": 0, "B": 0, "C": 0}

    def step() -> None:
        for o in engine.step():
            counts[o.request_id] = len(o.outputs[0].token_ids)

    while counts["A"] < 2:
        step()
    proxy.faults = [Fault("hold", method="HEAD"), Fault("hold", method="GET", query_contains="list-type=2")]
    engine.add_request("B", TokensPrompt(prompt_token_ids=b), params)
    timeline = []
    started = time.monotonic()
    while counts["B"] < params.max_tokens and time.monotonic() - started < 60:
        step()
        timeline.append([round(time.monotonic() - started, 3), counts["A"], counts["B"], proxy.held.is_set()])

    def probes() -> int:
        return sum(1 for q in proxy.requests if q.method == "HEAD" or "list-type=2" in q.query)

    heads = probes()
    engine.add_request("C", TokensPrompt(prompt_token_ids=c), params)
    while counts["C"] < params.max_tokens:
        step()
    report["hung"] = {
        "timeline": timeline,
        "c_heads": probes() - heads,
    }
    engine.abort_request(["A"])
    proxy.release()
    llm.llm_engine.engine_core.shutdown()
    proxy.stop()
    Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
