"""Run vLLM engines one after another in this process, on one checkpoint, and report each one's
outputs as JSON: with the VUAS3Connector or without it (what the model alone generates).

Runs in the vLLM venv. Every phase is a new engine (a new paged cache and a new connector, so
whatever it reuses came from the store); phases share the process to save vLLM's import.

    python identity_run.py MODEL_DIR URL SPEC_JSON OUT_JSON

SPEC: ``{"prompts": [[ids]], "lora_prompts": [[ids]], "lora": {"name", "id", "path"} or null,
"hf_overrides": {...} or null, "phases": [{"name": str, "connector": bool, "load_format"?: str}]}``.
Writes ``{phase: [{"tokens", "num_cached_tokens", "hit_tokens"}, ...]}``, the LoRA prompts' after
the others', or ``{phase: {"error": message}}`` for an engine that refused to start.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

SPLIT = 64


def main() -> None:
    model, url, spec_path, out_path = sys.argv[1:5]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = json.loads(Path(spec_path).read_text())
    lora = spec.get("lora")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    report: dict[str, Any] = {}
    for phase in spec["phases"]:
        transfer = None
        if phase["connector"]:
            transfer = {"kv_connector": "VUAS3Connector", "kv_role": "kv_both",
                        "kv_connector_module_path": "vua_s3.integrations.vllm",
                        "kv_connector_extra_config": {"url": url, "split_factor": SPLIT}}  # fmt: skip
        options: dict[str, Any] = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1} if lora else {}
        if spec.get("hf_overrides"):
            options["hf_overrides"] = spec["hf_overrides"]
        if "load_format" in phase:
            options["load_format"] = phase["load_format"]
        try:
            llm = LLM(
                model=model, skip_tokenizer_init=True, dtype="float32", block_size=32, max_model_len=1024,
                enforce_eager=True, enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20, seed=0,
                kv_transfer_config=transfer, **options,
            )  # fmt: skip
        except Exception as exc:  # the test reads why it refused
            report[phase["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
        if lora:
            adapter = LoRARequest(lora["name"], lora["id"], lora["path"])
            prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["lora_prompts"]]
            results += llm.generate(prompts, params, use_tqdm=False, lora_request=adapter)
        report[phase["name"]] = [
            {
                "tokens": list(r.outputs[0].token_ids),
                "num_cached_tokens": r.num_cached_tokens,
                "hit_tokens": (r.kv_transfer_params or {}).get("vua_s3", {}).get("hit_tokens"),
            }
            for r in results
        ]
        llm.llm_engine.engine_core.shutdown()  # the connector flushes its uploads: the next phase sees them
        del llm
        gc.collect()
    Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
