#!/usr/bin/env bash
# Download every wheel the GPU check installs offline (docs/gpu.md): scripts/gpu_requirements.txt
# and its dependencies for CPython on manylinux x86_64, plus vua_s3's own wheel. Prints the total;
# fails over the limit (the device machine takes 64 MiB of working tree, the repository included).
#   VUA_WHEELS_DIR      where the wheels go, emptied first (default .whl, which git ignores)
#   VUA_WHEELS_PYTHON   the target Python version (default 3.12, the GPU machine's)
#   VUA_WHEELS_MAX_MIB  the limit on the total (default 62)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${VUA_WHEELS_DIR:-.whl}
target=${VUA_WHEELS_PYTHON:-3.12}
max_mib=${VUA_WHEELS_MAX_MIB:-62}
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
rm -rf "$dir"
mkdir -p "$dir"
"$python" -m pip download -q --only-binary=:all: --python-version "$target" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" -r scripts/gpu_requirements.txt
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# Built from a copy of the files git tracks or would track, so the work tree gets no build/ or egg-info.
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$build"
"$python" -m pip wheel -q --no-deps -w "$dir" "$build"
{
    echo "commit $(git rev-parse HEAD)$([ -z "$(git status --porcelain -- vua_s3)" ] || echo ' (vua_s3 modified)')"
    echo "built $(date -u '+%Y-%m-%d %H:%M UTC') for CPython $target"
} > "$dir/SOURCE"
total=$(cat "$dir"/*.whl | wc -c)
ls -1 "$dir"
echo "$(find "$dir" -type f -name '*.whl' | wc -l) wheels, $((total / 1024)) KiB ($(awk "BEGIN{printf \"%.1f\", $total/1048576}") MiB) in $dir"
if [ "$total" -gt $((max_mib * 1048576)) ]; then
    echo "gpu_wheels.sh: $dir holds more than $max_mib MiB" >&2
    exit 1
fi
