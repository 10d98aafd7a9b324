"""The connector's identity of vLLM configurations as vLLM resolves them (no engine is started).

Runs in the vLLM venv: for each named variant of ``EngineArgs`` on MODEL_DIR, the namespace and
identity ``derive_identity`` gives, or the error ``check_supported`` or vLLM raises.

    python identity_configs.py MODEL_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {
    "skip_tokenizer_init": True,
    "dtype": "float32",
    "block_size": 32,
    "max_model_len": 1024,
    "enforce_eager": True,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "again": {},
    # Not in the identity: none of these changes a stored byte.
    "tp2": {"tensor_parallel_size": 2},
    "block16": {"block_size": 16},
    "flex_attention": {"attention_config": {"backend": "FLEX_ATTENTION"}},
    # In the identity.
    "bfloat16": {"dtype": "bfloat16"},
    "kv_bfloat16": {"kv_cache_dtype": "bfloat16"},
    "hf_overrides": {"hf_overrides": {"rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}},
    "max_model_len": {"max_model_len": 512},
    "pp2": {"pipeline_parallel_size": 2},
    # Refused.
    "dcp2": {"tensor_parallel_size": 4, "decode_context_parallel_size": 2},
    "pcp2": {"prefill_context_parallel_size": 2},
    "dummy": {"load_format": "dummy"},
}


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    from vllm.engine.arg_utils import EngineArgs

    from vua_s3.integrations.vllm.identity import check_supported, derive_identity
    from vua_s3.integrations.vllm.settings import ConnectorSettings

    settings = ConnectorSettings(url="/unused")
    report: dict[str, Any] = {}
    for name, change in VARIANTS.items():
        try:
            config = EngineArgs(model=model, **(BASE | change)).create_engine_config()
            check_supported(config, None)
            ranks = range(config.parallel_config.pipeline_parallel_size)
            stages = [derive_identity(config, settings, rank) for rank in ranks]
            report[name] = {"namespaces": [s.namespace for s in stages], "identities": [s.identity for s in stages],
                            "readable": stages[0].inputs}  # fmt: skip
        except Exception as exc:  # the test reads which variants were refused, and why
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
