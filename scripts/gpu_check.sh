#!/usr/bin/env bash
# The GPU check (docs/gpu.md), one command on a CUDA machine without a network: install the
# carried wheels offline, run tests/gpu and `vua-s3 bench-gpu`, and write OUTDIR/report.json
# (scripts/gpu_report.py) beside OUTDIR/check.log, tests.xml and bench.json. Each phase runs
# under its own time budget, so a hung one is killed and the others still run; with the default
# budgets the whole check ends within 7 min. Without CUDA it runs too (the cuda cases skip, the
# bench says so, on a tiny shape): that is how this script is tested.
#   scripts/gpu_check.sh OUTDIR      the check
#   scripts/gpu_check.sh --install   only the install (into VUA_GPU_VENV)
# Settings (environment):
#   VUA_GPU_PYTHON      the interpreter that has torch, transformers and pytest (default python3)
#   VUA_GPU_WHEELS      the wheel folder scripts/gpu_wheels.sh filled (default .whl)
#   VUA_GPU_VENV        the venv made over that interpreter's packages (default /tmp/vua-gpu-venv);
#                       "none" installs into the interpreter's own environment instead
#   VUA_GPU_BUDGETS     seconds for install,tests,bench (default 45,200,130)
#   VUA_GPU_SANITIZER   seconds for compute-sanitizer's racecheck over the cuda capture tests
#                       (default 0: not run)
#   VUA_GPU_BENCH_ARGS  arguments of bench-gpu (default on CUDA: Llama-3-8B, 8k tokens POSIX,
#                       2k S3; without CUDA: 2 layers, 512 tokens, 2 repeats)
#   VUA_GPU_TEST_TOKENS tokens of the cuda put/get tests (default 8192)
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${VUA_GPU_PYTHON:-python3}
venv=${VUA_GPU_VENV:-/tmp/vua-gpu-venv}
wheels=${VUA_GPU_WHEELS:-.whl}

install() {
    if [ ! -d "$wheels" ]; then
        echo "gpu_check.sh: no $wheels: run scripts/gpu_wheels.sh on a machine with a network and carry it" >&2
        return 2
    fi
    local pip=("$py" -m pip)
    if [ "$venv" != none ]; then
        rm -rf "$venv"
        "$py" -m venv --without-pip "$venv" || return 1
        # The interpreter's own packages (torch, transformers, pytest) stay visible, behind the venv's,
        # also when that interpreter is itself a venv (--system-site-packages would skip its packages).
        local site
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
        "$py" -c 'import os, sys
dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
print("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs), end="")' > "$site/_vua_gpu_base.pth" || return 1
        pip+=(--python "$venv/bin/python")
    fi
    "${pip[@]}" install --no-index --find-links "$wheels" --no-cache-dir --disable-pip-version-check \
        -r scripts/gpu_requirements.txt vua_s3 || return 1
    PYTHONPATH=$repo "$(python_of_check)" -c '
import aioboto3, awscrt, flask, moto, pytest_timeout, torch, transformers, vua_s3
print("installed: vua_s3 from", vua_s3.__file__, "| torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "| transformers", transformers.__version__, "| moto", moto.__version__)'
}

python_of_check() {
    if [ "$venv" = none ]; then echo "$py"; else echo "$venv/bin/python"; fi
}

if [ "${1:-}" = --install ]; then
    install
    exit
fi

phase() {  # NAME BUDGET COMMAND...: the command under its budget, its exit status noted in phases.txt
    local name=$1 budget=$2 start=$SECONDS rc
    shift 2
    echo "=== $name: budget ${budget} s, $(date -u '+%H:%M:%S UTC')"
    timeout -k 10 "$budget" "$@"
    rc=$?
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "=== $name: killed at its budget of $budget s"
    echo "$name $rc $((SECONDS - start)) $budget" >> "$out/phases.txt"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

check() {
    IFS=, read -r install_s tests_s bench_s <<< "${VUA_GPU_BUDGETS:-45,200,130}"
    : > "$out/phases.txt"
    echo "vua_s3 GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -srm)"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    [ -f "$wheels/SOURCE" ] && cat "$wheels/SOURCE"
    # POSIX stores in /dev/shm when it has room for the bench (3 GiB of 8k-token Llama-3-8B KV), else on disk.
    local shm_kib
    shm_kib=$(df -Pk /dev/shm 2> /dev/null | awk 'NR == 2 { print $4 }')
    if [ "${shm_kib:-0}" -gt $((6 << 20)) ]; then posix=/dev/shm/vua-gpu-check-$$; else posix=${TMPDIR:-/tmp}/vua-gpu-check-$$; fi
    mkdir -p "$posix"
    echo "POSIX stores in $posix (/dev/shm has ${shm_kib:-no} KiB free)" | tee "$out/posix_dir.txt"

    phase install "$install_s" bash scripts/gpu_check.sh --install
    local vpy cuda
    vpy=$(python_of_check)
    cuda=$(PYTHONPATH=$repo "$vpy" -c 'import torch; print(int(torch.cuda.is_available()))' 2> /dev/null || echo 0)
    export PYTHONPATH=$repo PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VUA_GPU_POSIX_DIR=$posix
    phase tests "$tests_s" "$vpy" -m pytest tests/gpu -m gpu -v -p no:cacheprovider --timeout=180 \
        --junitxml="$out/tests.xml"
    local bench_args=${VUA_GPU_BENCH_ARGS:-}
    if [ -z "$bench_args" ]; then
        if [ "$cuda" = 1 ]; then bench_args="--tokens 8192 --s3-tokens 2048"; else bench_args="--layers 2 --tokens 512 --s3-tokens 512 --repeats 2"; fi
    fi
    # shellcheck disable=SC2086  # the arguments are words
    phase bench "$bench_s" "$vpy" -m vua_s3.cli bench-gpu $bench_args --posix-dir "$posix" --out "$out/bench.json"
    if [ "${VUA_GPU_SANITIZER:-0}" -gt 0 ]; then
        if [ "$cuda" = 1 ] && command -v compute-sanitizer > /dev/null; then
            phase racecheck "$VUA_GPU_SANITIZER" compute-sanitizer --tool racecheck --error-exitcode 3 \
                "$vpy" -m pytest tests/gpu/test_gpu_paged.py -m gpu -q -p no:cacheprovider -k "cuda and capture"
        else
            echo "racecheck skipped 0 0" >> "$out/phases.txt"
        fi
    fi
    rm -rf "$posix"
    "$py" scripts/gpu_report.py "$out"
}

out=${1:?usage: scripts/gpu_check.sh OUTDIR | --install}
mkdir -p "$out" && out=$(cd "$out" && pwd)
check 2>&1 | tee "$out/check.log"
exit "${PIPESTATUS[0]}"
