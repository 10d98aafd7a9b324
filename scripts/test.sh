#!/usr/bin/env bash
# Set up, then lint, type-check and run the whole test suite (pytest arguments pass through).
#   VUA_TEST_WORKERS  pytest-xdist workers (default 2; 0: no xdist, one process)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${VUA_VENV:-.venv}
"$venv/bin/python" -m ruff check vua_s3 tests examples scripts
"$venv/bin/python" -m ruff format --check vua_s3 tests examples scripts
"$venv/bin/python" -m mypy vua_s3
export CHECKOV_BIN=${CHECKOV_BIN:-$PWD/${VUA_CHECKOV_VENV:-.venv-checkov}/bin/checkov}
# Two workers: the real-engine tests on one (tests/vllm/conftest.py groups them), the rest beside
# them; VUA_TEST_WORKERS=0 runs everything in this process (e.g. for -s or a debugger).
workers=${VUA_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
    exec "$venv/bin/python" -m pytest "$@"
fi
exec "$venv/bin/python" -m pytest -n "$workers" --dist loadgroup "$@"
