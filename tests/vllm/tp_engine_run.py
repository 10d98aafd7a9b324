"""Run one vLLM engine of a given tensor-parallel size, with or without the connector, as JSON.

Runs in the vLLM venv, one fresh process per engine. TP > 1 uses vLLM's multiprocessing
executor, whose workers are spawned: everything runs under ``__main__`` and the workers
find this checkout's vua_s3 through ``PYTHONPATH`` (set by the test).

    python tp_engine_run.py MODEL_DIR URL|- PROMPTS_JSON OUT_JSON --tp N [--split-factor S]

URL ``-`` runs without the connector (the reference output). Writes
``{"outputs": [{"tokens": [...], "num_cached_tokens": n, "kv_transfer_params": {...}}]}``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("url")
    parser.add_argument("prompts", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--split-factor", type=int, default=64)
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.tp)))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    options: dict[str, object] = {}
    if args.url != "-":
        options["kv_transfer_config"] = {
            "kv_connector": "VUAS3Connector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "vua_s3.integrations.vllm",
            "kv_connector_extra_config": {"url": args.url, "split_factor": args.split_factor},
        }
    if args.tp > 1:
        options["distributed_executor_backend"] = "mp"
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
        tensor_parallel_size=args.tp,
        **options,
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
    llm.llm_engine.engine_core.shutdown()  # the connector flushes its uploads before we report
    args.out.write_text(json.dumps({"outputs": outputs}))


if __name__ == "__main__":
    main()
