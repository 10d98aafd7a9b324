"""``vua-s3 bench-vllm`` end to end in a tiny configuration: one run of every scenario, each with
the figures of its kind (the connector's counters and the store's own request counts where there
is a connector), every request's TTFT, and the printed report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vua_s3.bench.serving_report import format_serve_report

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-engines")]

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("prompt_local_compute", "prompt_local_cache_hit", "prompt_external_kv_transfer")
# one document of 256 tokens (2 groups of 128) asked 2 questions of 16 tokens, 2 clients at once
PROMPT = 256 + 16
HOT = 256 + 128 + 16  # the system prompt, a group of its own, a question
TINY = ["--docs", "1", "--questions", "2", "--doc-tokens", "256", "--question-tokens", "16", "--max-tokens", "4",
        "--concurrency", "2", "--layers", "1", "--hidden", "128", "--split-factor", "128",
        "--repeats", "1"]  # fmt: skip


def test_bench_vllm_reports_every_scenario(vllm_python: Path, tmp_path: Path) -> None:
    per_request = tmp_path / "requests.json"
    command = [sys.executable, "-m", "vua_s3.cli", "bench-vllm", *TINY, "--vllm-venv", str(vllm_python.parents[1]),
               "--work-dir", str(tmp_path), "--per-request", str(per_request), "--json"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    names = ["none", "empty", "warm", "warm+20ms", "same-prefix", "same-prefix-warm", "hot"]
    assert list(report["scenarios"]) == names and list(report["per_request"]) == names
    assert report["store"] in ("seaweed", "moto") and report["machine"] and len(report["load_average"]) == 3
    assert report["options"]["cpu_hog"] == 0 and len(report["load_average_start"]) == 3
    group = 128 * 1 * 2 * 1 * 64 * 4  # split factor x layers x K/V x KV heads x head dim x float32
    for name, scenario in report["scenarios"].items():
        (run,) = scenario["runs"]
        assert run["requests"] == 2, name
        assert 0 < run["ttft_p50"] <= run["ttft_p90"] <= run["ttft_max"], (name, run)
        assert run["tok_s"] > 0 and run["req_s"] > 0 and run["server_cpu_s"] > 0, (name, run)
        ((first, second),) = report["per_request"][name]
        assert max(first["ttft_s"], second["ttft_s"]) == run["ttft_max"], (name, first, second)
        assert first["tokens"] == second["tokens"] == 4 and min(first["start_s"], second["start_s"]) >= 0
        assert first["opening"] == second["opening"] == 0, name  # one document (or system prompt) shared
        store = run["store"]
        size = HOT if name == "hot" else PROMPT
        assert first["prompt_tokens"] == second["prompt_tokens"] == size, name
        assert sum(store[k] for k in SOURCES) == 2 * size, (name, store)  # vLLM's count of the prompts' tokens
        for figure in ("ttft_p50", "tok_s"):
            assert scenario["summary"][figure]["median"] == run[figure]
        if name == "none":
            assert store["lookups"] == 0 and run["cpu_s_per_gib"] is None and "traffic" not in run, run
            assert run["store_side_cpu_s"] is None, run
            continue
        if report["store"] == "seaweed":  # the server's and the proxy's CPU, counted apart from vLLM's
            assert run["store_side_cpu_s"] > 0, (name, run)
        _check_connector_run(name, run, group)
    # every store request of the slow scenario went through the proxy's 20 ms
    slow = report["scenarios"]["warm+20ms"]["runs"][0]["store"]
    assert slow["lookup_seconds"] >= 0.02 * slow["lookups"], slow
    assert json.loads(per_request.read_text())["per_request"] == report["per_request"]
    printed = format_serve_report(report)
    assert all(f"| {name} |" in printed for name in names) and "slowest requests" in printed


def test_bench_vllm_on_a_posix_store(vllm_python: Path, tmp_path: Path) -> None:
    """A directory for a store: the warm server loads what the filling one wrote, with no proxy
    in between (so no request counts and no store-side CPU)."""
    command = [sys.executable, "-m", "vua_s3.cli", "bench-vllm", *TINY, "--scenarios", "none,empty,warm",
               "--store", "posix", "--vllm-venv", str(vllm_python.parents[1]), "--work-dir", str(tmp_path),
               "--json"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["store"] == "posix" and list(report["scenarios"]) == ["none", "empty", "warm"]
    group = 128 * 1 * 2 * 1 * 64 * 4
    (empty,) = report["scenarios"]["empty"]["runs"]
    (warm,) = report["scenarios"]["warm"]["runs"]
    assert empty["store"]["store_bytes"] >= 2 * group and empty["store"]["hit_tokens"] == 0, empty
    assert warm["store"]["hit_tokens"] >= 256 and warm["store"]["prompt_external_kv_transfer"] >= 256, warm
    assert warm["store"]["load_bytes"] >= 2 * group and warm["store"]["store_bytes"] == 0, warm
    for run in (empty, warm):
        assert "traffic" not in run and run["store_side_cpu_s"] is None, run
    assert len(list((tmp_path / "store").rglob("*.safetensors"))) >= 2  # a group's heads: one file each
    assert "posix (files in the work dir" in format_serve_report(report)


def _check_connector_run(name: str, run: dict[str, Any], group: int) -> None:
    """What must hold of a connector scenario, whatever the connector's dedup and trust do."""
    store, t = run["store"], run["traffic"]
    assert store["lookups"] >= 1 and run["cpu_s_per_gib"] > 0 and t["errors"] == 0, (name, run)
    assert t["requests"]["LIST"] + t["requests"]["HEAD"] >= 1 and t["requests"]["other"] == 0, (name, t)
    assert t["per_prompt"]["LIST"] == t["requests"]["LIST"] / 2, t
    # the connector's byte counts agree with the store's object counts (each object: a group's KV and a header)
    assert t["fragment_puts"] * group <= store["store_bytes"] <= t["fragment_puts"] * group * 1.1, (name, store, t)
    assert t["fragment_gets"] * group <= store["load_bytes"] <= t["fragment_gets"] * group * 1.1, (name, store, t)
    if name in ("empty", "same-prefix"):  # a new document: stored (at least once per group), nothing loaded
        assert store["hit_tokens"] == 0 and t["fragment_gets"] == 0 and t["loads_per_group"] is None, (name, t)
        uploads = t["uploads_per_group"]
        assert uploads["groups"] == 2 and 1 <= uploads["mean"] <= uploads["max"] <= 2, (name, t)
    elif name == "hot":  # the stored system prompt (2 groups) loaded; each request's own group stored once
        assert store["hit_tokens"] >= 256 and store["prompt_external_kv_transfer"] >= 256, (name, store)
        assert t["loads_per_group"]["groups"] == 2 and 1 <= t["loads_per_group"]["max"] <= 2, (name, t)
        assert t["uploads_per_group"] == {"groups": 2, "mean": 1.0, "max": 1.0}, (name, t)
    else:  # a new process on a stored document: it loads both groups, stores nothing
        assert store["hit_tokens"] >= 256 and store["prompt_external_kv_transfer"] >= 256, (name, store)
        loads = t["loads_per_group"]
        assert loads["groups"] == 2 and 1 <= loads["mean"] <= loads["max"] <= 2, (name, t)
        assert store["store_bytes"] == 0 and t["fragment_puts"] == 0 and t["uploads_per_group"] is None, (name, t)
