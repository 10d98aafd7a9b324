"""One vLLM engine whose connector refreshes what it loads (``refresh_after``); reports JSON.

Runs in the vLLM venv, one fresh process. After the prompts it keeps stepping the engine
with a short request (no lookup: shorter than a group) until the connector's metrics
show ``--expect`` refreshes answered, or 50 rounds: refreshes run in the background and
are counted as they end.

    python refresh_run.py MODEL_DIR URL PROMPTS_JSON OUT_JSON REFRESH_AFTER EXPECT

Writes ``{"outputs": [{"tokens": [...], "kv_transfer_params": {...}}], "metrics": {...}}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SPLIT = 64


def main() -> None:
    model, url, prompts_path, out_path, refresh_after, expect = sys.argv[1:7]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"url": url, "split_factor": SPLIT, "refresh_after": float(refresh_after)}
    llm = LLM(
        model=model, skip_tokenizer_init=True, dtype="float32", block_size=32, max_model_len=1024,
        enforce_eager=True, enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20, seed=0,
        disable_log_stats=False,
        kv_transfer_config={"kv_connector": "VUAS3Connector", "kv_role": "kv_both",
                            "kv_connector_module_path": "vua_s3.integrations.vllm",
                            "kv_connector_extra_config": extra},
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = json.loads(Path(prompts_path).read_text())
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    outputs = [{"tokens": list(r.outputs[0].token_ids), "kv_transfer_params": r.kv_transfer_params} for r in results]

    def metrics() -> dict[str, float]:
        return {m.name: getattr(m, "value", 0) for m in llm.get_metrics() if m.name.startswith("vllm:vua_s3_")}

    for _ in range(50):
        found = metrics()
        if found.get("vllm:vua_s3_refreshes", 0) + found.get("vllm:vua_s3_refresh_failures", 0) >= int(expect):
            break
        time.sleep(0.1)  # the refreshes' threads run meanwhile; the next step reports them
        llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7])], params, use_tqdm=False)
    Path(out_path).write_text(json.dumps({"outputs": outputs, "metrics": metrics()}))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
