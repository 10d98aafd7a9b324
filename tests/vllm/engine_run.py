"""Run one vLLM engine with the VUAS3Connector and report what it did, as JSON.

Runs in the vLLM venv (``scripts/vllm_venv.sh``), one fresh process per engine, so
every run starts with an empty paged cache: whatever it reuses came from the store.

    python engine_run.py MODEL_DIR URL PROMPTS_JSON OUT_JSON [--max-tokens N] [--registered]

``--registered`` leaves ``kv_connector_module_path`` out, relying on the plugin entry
point; ``--no-shutdown`` ends the script without shutting the engine down, as an
offline script that simply ends does. Writes ``{"outputs": [{"tokens": [...], "num_cached_tokens": n,
"kv_transfer_params": {...}}], "seconds": s}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("url")
    parser.add_argument("prompts", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--split-factor", type=int, default=64)
    parser.add_argument("--registered", action="store_true")
    parser.add_argument("--no-shutdown", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    transfer: dict[str, object] = {
        "kv_connector": "VUAS3Connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"url": args.url, "split_factor": args.split_factor},
    }
    if not args.registered:
        transfer["kv_connector_module_path"] = "vua_s3.integrations.vllm"
    started = time.perf_counter()
    llm = LLM(
        model=args.model_dir,
        skip_tokenizer_init=True,
        dtype="float32",
        block_size=32,
        max_model_len=1024,
        enforce_eager=True,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=64 << 20,
        seed=0,
        kv_transfer_config=transfer,
    )
    prompts = json.loads(args.prompts.read_text())
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    outputs = [
        {
            "tokens": list(r.outputs[0].token_ids),
            "num_cached_tokens": r.num_cached_tokens,
            "kv_transfer_params": r.kv_transfer_params,
        }
        for r in results
    ]
    if not args.no_shutdown:  # shut the engine down, so the connector flushes its uploads before we report
        llm.llm_engine.engine_core.shutdown()
    args.out.write_text(json.dumps({"outputs": outputs, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
