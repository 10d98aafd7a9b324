#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment. Idempotent.
#   VUA_VENV   where the venv lives (default: .venv in the repository)
#   VUA_TORCH  the torch requirement installed first (default: the CPU build torch==2.13.0;
#              on a GPU machine set it to the build that fits, e.g. VUA_TORCH=torch)
#   VUA_SETUP  "demo": only what `vua-s3 demo` needs (the embedded S3 server), no test venvs;
#              anything else (the default, "test"): the dev tools and every venv the tests use
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VUA_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${VUA_TORCH:-torch==2.13.0}"
if [ "${VUA_SETUP:-test}" = demo ]; then
    "$venv/bin/python" -m pip install -q -e ".[embedded]"
    exit 0
fi
"$venv/bin/python" -m pip install -q -e ".[dev,transformers]"
# vLLM engine tests: vLLM pins its own torch and transformers, so it gets a venv of its own,
# reused between runs (about 7 minutes and 3.5 GB the first time on a machine).
[ "${VUA_SKIP_VLLM:-0}" = 1 ] || bash scripts/vllm_venv.sh >/dev/null
# checkov (the offline Terraform policy scanner) pins its own boto3: it gets a venv of its own.
checkov_venv=${VUA_CHECKOV_VENV:-.venv-checkov}
[ -x "$checkov_venv/bin/checkov" ] || { python3 -m venv "$checkov_venv" && "$checkov_venv/bin/python" -m pip install -q checkov; }
