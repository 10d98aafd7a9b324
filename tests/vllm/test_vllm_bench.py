"""``vua-s3 bench-vllm`` end to end in a tiny configuration: one run of every scenario,
each with the figures of its kind (the connector's traffic where there is one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]


def test_bench_vllm_reports_every_scenario(vllm_python: Path, tmp_path: Path) -> None:
    tiny = ["--docs", "1", "--questions", "2", "--doc-tokens", "256", "--question-tokens", "16",
            "--max-tokens", "4", "--concurrency", "2", "--layers", "1", "--hidden", "128", "--split-factor", "128",
            "--repeats", "1"]  # fmt: skip
    command = [sys.executable, "-m", "vua_s3.cli", "bench-vllm", *tiny, "--vllm-venv", str(vllm_python.parents[1]),
               "--work-dir", str(tmp_path), "--json"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert list(report["scenarios"]) == ["none", "empty", "warm", "warm+20ms"]
    assert report["store"] in ("seaweed", "moto") and report["machine"] and len(report["load_average"]) == 3
    group = 128 * 1 * 2 * 1 * 64 * 4  # split factor x layers x K/V x KV heads x head dim x float32
    for name, scenario in report["scenarios"].items():
        (run,) = scenario["runs"]
        assert run["requests"] == 2, name
        assert 0 < run["ttft_p50"] <= run["ttft_p90"] <= run["ttft_max"], (name, run)
        assert run["tok_s"] > 0 and run["req_s"] > 0 and run["server_cpu_s"] > 0, (name, run)
        store = run["store"]
        sources = ("prompt_local_compute", "prompt_local_cache_hit", "prompt_external_kv_transfer")
        assert sum(store[k] for k in sources) == 2 * 272, (name, store)  # vLLM's count of the prompts' tokens
        if name == "none":
            assert store["lookups"] == 0 and run["cpu_s_per_gib"] is None, run
            continue
        assert store["lookups"] >= 1 and run["cpu_s_per_gib"] > 0, (name, run)
        if name == "empty":  # the document's two whole groups (the prompt's 272 tokens hold two)
            assert store["hit_tokens"] == 0 and store["store_bytes"] >= 2 * group, run
        else:  # a new process reads them: each request that looked up loads both
            assert store["hit_tokens"] >= 256 and store["load_bytes"] >= 2 * group, (name, run)
            assert store["store_bytes"] == 0 and store["prompt_external_kv_transfer"] >= 256, (name, run)
        for figure in ("ttft_p50", "tok_s", "lookups", "load_bytes"):
            assert scenario["summary"][figure]["median"] == (run[figure] if figure in run else store[figure])
    # every store request of the slow scenario went through the proxy's 20 ms
    slow = report["scenarios"]["warm+20ms"]["runs"][0]["store"]
    assert slow["lookup_seconds"] >= 0.02 * slow["lookups"], slow
