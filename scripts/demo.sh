#!/usr/bin/env bash
# Set up, then run the main job: vua-s3 demo on an embedded S3 server (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
VUA_SETUP=demo bash scripts/setup.sh
exec "${VUA_VENV:-.venv}/bin/vua-s3" demo "$@"
