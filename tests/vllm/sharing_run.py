"""One vLLM engine meets the store through a counting fault proxy; reports JSON.

Runs in the vLLM venv (one fresh process). With ``--prefix-caching``:

* ``arrival``: prompt Q is stored and dropped from the local prefix cache; then a new
  prompt (a miss) and Q (a hit) are added and their lookups left to finish before the
  engine steps: every ``get_num_new_matched_tokens`` answer.
* ``shared``: Q's prefix with two other endings, added at once (nothing local): the GETs.
* ``hot``: three more requests on Q's prefix, one after another (nothing local): the LISTs.

Without (``--no-prefix-caching``), ``uploads``: two requests with the same new prefix at
once: the PUTs.

    python sharing_run.py MODEL_DIR MOTO_PORT BUCKET PREFIX OUT_JSON [--prefix-caching]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from vua_s3.testing.faultproxy import FaultProxy

SPLIT = 64


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model", "moto_port", "bucket", "prefix"):
        parser.add_argument(name)
    parser.add_argument("out", type=Path)
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    proxy = FaultProxy(int(args.moto_port)).start()
    url = (f"s3://{args.bucket}/{args.prefix}?endpoint_url={proxy.endpoint_url}&region=us-east-1"
           "&addressing=path&max_attempts=1")  # fmt: skip
    llm = LLM(
        model=args.model, skip_tokenizer_init=True, dtype="float32", block_size=32, max_model_len=1024,
        enforce_eager=True, enable_prefix_caching=args.prefix_caching, kv_cache_memory_bytes=64 << 20, seed=0,
        kv_transfer_config={"kv_connector": "VUAS3Connector", "kv_role": "kv_both",
                            "kv_connector_module_path": "vua_s3.integrations.vllm",
                            "kv_connector_extra_config": {"url": url, "split_factor": SPLIT}},
    )  # fmt: skip
    engine = llm.llm_engine
    connector = engine.engine_core.engine_core.scheduler.connector
    answers: list[list[Any]] = []
    asked = connector.get_num_new_matched_tokens

    def recorded(request: Any, num_computed_tokens: int) -> Any:
        answer = asked(request, num_computed_tokens)
        answers.append([request.request_id, num_computed_tokens, answer[0]])
        return answer

    connector.get_num_new_matched_tokens = recorded
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    gen = torch.Generator().manual_seed(21)

    def fresh(length: int) -> list[int]:
        return torch.randint(3, 512, (length,), generator=gen).tolist()

    def quiet() -> None:
        """Until the proxy saw no request for 1 s (lookups and uploads run behind the engine)."""
        seen, since = len(proxy.requests), time.monotonic()
        while time.monotonic() - since < 1.0:
            time.sleep(0.05)
            if len(proxy.requests) != seen:
                seen, since = len(proxy.requests), time.monotonic()

    def stored(mark: int, objects: int) -> None:
        """Until ``objects`` fragments were uploaded since ``mark`` (behind the engine)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(r.method == "PUT" and r.path.endswith(".safetensors") for r in proxy.requests[mark:]) >= objects:
                return
            time.sleep(0.05)

    def requests_since(mark: int) -> list[list[str]]:
        quiet()
        return [[r.method, r.path, r.query] for r in proxy.requests[mark:]]

    def serve(prompts: dict[str, list[int]]) -> None:
        """Add every prompt, let their lookups finish (the engine would be busy), then step."""
        for req_id, prompt in prompts.items():
            engine.add_request(req_id, TokensPrompt(prompt_token_ids=prompt), params)
        quiet()
        while engine.has_unfinished_requests():
            engine.step()

    def reset() -> None:
        """Reset vLLM's prefix cache. Finished requests' blocks stay held until the workers
        report their copies out of them, which a step carries: step a prompt shorter than a
        group (nothing to look up or store) until the cache is free."""
        for _ in range(20):
            quiet()
            if llm.reset_prefix_cache():
                return
            llm.generate([TokensPrompt(prompt_token_ids=fresh(8))], params, use_tqdm=False)
        raise AssertionError("vLLM's prefix cache never became free to reset")

    report: dict[str, Any] = {}
    if args.prefix_caching:
        q = fresh(4 * SPLIT + 22)
        mark = len(proxy.requests)
        llm.generate([TokensPrompt(prompt_token_ids=q)], params, use_tqdm=False)
        stored(mark, 4 * 2)  # 4 groups, 2 KV heads
        quiet()
        reset()
        mark, answers[:] = len(proxy.requests), []
        serve({"miss": fresh(150), "hit": q})
        report["arrival"] = {"answers": list(answers), "requests": requests_since(mark)}
        reset()
        mark, answers[:] = len(proxy.requests), []
        serve({"s1": q[: 4 * SPLIT] + fresh(30), "s2": q[: 4 * SPLIT] + fresh(30)})
        report["shared"] = {"answers": list(answers), "requests": requests_since(mark)}
        hot = []
        for i in range(3):
            reset()
            mark = len(proxy.requests)
            serve({f"hot{i}": q[: 4 * SPLIT] + fresh(30)})
            hot.append(requests_since(mark))
        report["hot"] = hot
    else:
        r = fresh(4 * SPLIT)
        mark = len(proxy.requests)
        serve({"u1": r + fresh(30), "u2": r + fresh(30)})
        engine.engine_core.shutdown()  # every queued upload flushed
        report["uploads"] = {"requests": [[r.method, r.path, r.query] for r in proxy.requests[mark:]]}
    if args.prefix_caching:
        engine.engine_core.shutdown()
    proxy.stop()
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
