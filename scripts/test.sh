#!/usr/bin/env bash
# Set up, then lint, type-check and run the whole test suite (pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${VUA_VENV:-.venv}
"$venv/bin/python" -m ruff check vua_s3 tests examples scripts
"$venv/bin/python" -m ruff format --check vua_s3 tests examples scripts
"$venv/bin/python" -m mypy vua_s3
export CHECKOV_BIN=${CHECKOV_BIN:-$PWD/${VUA_CHECKOV_VENV:-.venv-checkov}/bin/checkov}
exec "$venv/bin/python" -m pytest "$@"
