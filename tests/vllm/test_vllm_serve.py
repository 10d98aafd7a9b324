"""The connector's metrics in ``vllm serve``'s ``/metrics``, read over real HTTP.

One server (prefix caching off, so a repeated prompt goes to the store) from
``examples/bench_vllm_serve.py``: a prompt is stored, then asked again and loaded;
the ``vllm:vua_s3_*`` counters show the lookups, the hit and the bytes both ways.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import pytest

from vua_s3.testing.moto import EmbeddedS3

pytestmark = pytest.mark.vllm

BENCH = Path(__file__).resolve().parents[2] / "examples" / "bench_vllm_serve.py"


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_vllm_serve", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics_in_vllm_serve(vllm_python: Path, tiny_llama: Path, tmp_path: Path) -> None:
    bench = _bench()
    args = argparse.Namespace(vllm_venv=str(vllm_python.parents[1]), split_factor=64)
    prompt = list(range(3, 3 + 150))
    with EmbeddedS3() as s3, bench.server(args, tiny_llama, s3.url("serve"), tmp_path / "serve.log",  # type: ignore[attr-defined]
                                          "--no-enable-prefix-caching", "--max-model-len", "1024") as base:  # fmt: skip
        model = str(tiny_llama)
        _, tokens = bench.complete(base, model, prompt, 4)  # type: ignore[attr-defined]
        assert tokens == 4
        deadline = time.monotonic() + 60
        while bench.metrics(base).get("stored_groups", 0) < 2 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.5)
        bench.complete(base, model, prompt, 4)  # type: ignore[attr-defined]
        found = bench.metrics(base)  # type: ignore[attr-defined]
    assert found["stored_groups"] == 2, found
    assert found["lookups"] == 2, found
    assert found["hit_tokens"] == 128, found
    assert found["loaded_tokens"] == 128, found
    assert found["load_bytes"] > 0 and found["store_bytes"] > 0, found
    assert found["lookup_heads"] == 4, found
    assert found["breaker_open"] == 0, found
