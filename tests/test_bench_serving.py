"""The serving bench's parts that need no engine: store traffic as a counting proxy sees it (real
VUA requests to moto), the order servers and scenarios run in, the CPU hogs, the report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import random_kvcache, unique_prefix

from vua_s3 import VUA, VUAConfig
from vua_s3.bench.cpu_hog import cpu_hogs
from vua_s3.bench.serving_bench import SCENARIOS, ServeBenchOptions, run_serve_bench, server_order
from vua_s3.bench.serving_report import slowest, summarize
from vua_s3.bench.serving_traffic import traffic
from vua_s3.bench.serving_workloads import PromptShape, hot, regular, same_prefix
from vua_s3.testing.faultproxy import FaultProxy
from vua_s3.testing.moto import EMBEDDED_REGION, EmbeddedS3

SPLIT = 4
CFG = VUAConfig(split_factor=SPLIT, namespace="bench")


def test_traffic_counts_each_group_object_once_per_load_and_upload(moto_server: EmbeddedS3) -> None:
    tokens = torch.arange(3 * SPLIT)
    kv = random_kvcache(layers=1, seq_len=3 * SPLIT, heads=2, head_dim=8)
    with FaultProxy(moto_server.port) as proxy:
        url = (f"s3://{moto_server.bucket}/{unique_prefix()}?endpoint_url={proxy.endpoint_url}"
               f"&region={EMBEDDED_REGION}&addressing=path")  # fmt: skip
        with VUA(CFG, url) as vua:
            assert vua.put(tokens, kv) == 3  # groups
            stored = traffic(list(proxy.requests), prompts=1)
        first = len(proxy.requests)
        with VUA(CFG, url) as vua:  # another reader: it knows nothing stored, so it probes
            for _ in range(2):
                assert vua.get_closest(tokens, device="cpu") is not None
            loaded = traffic(proxy.requests[first:], prompts=2)
    # 3 groups of 2 heads: one object each, written once
    assert stored["fragment_puts"] == 6 and stored["fragment_gets"] == 0, stored
    assert stored["uploads_per_group"] == {"groups": 3, "mean": 1.0, "max": 1.0}
    assert stored["loads_per_group"] is None and stored["errors"] == 0
    # two loads: every object fetched twice, found by LISTs (a group's heads in one)
    assert loaded["fragment_gets"] == 12 and loaded["fragment_puts"] == 0, loaded
    assert loaded["loads_per_group"] == {"groups": 3, "mean": 2.0, "max": 2.0}
    assert loaded["requests"]["LIST"] >= 1 and loaded["requests"]["PUT"] == 0
    assert loaded["per_prompt"]["LIST"] == loaded["requests"]["LIST"] / 2


def test_servers_run_in_turn_and_reading_scenarios_get_their_prompts_stored() -> None:
    assert server_order(SCENARIOS) == [
        ("none", ["none"], []),
        ("fill", ["empty", "same-prefix"], ["hot-prime"]),
        ("read", ["warm", "same-prefix-warm", "hot"], []),
        ("slow", ["slow"], []),
    ]
    # a reading scenario chosen alone has what it reads stored first, unmeasured
    assert server_order(("slow", "same-prefix-warm")) == [
        ("fill", [], ["regular", "same-prefix"]),
        ("read", ["same-prefix-warm"], []),
        ("slow", ["slow"], []),
    ]
    with pytest.raises(ValueError, match="unknown scenarios"):
        server_order(("warm", "cold"))


def test_the_slow_scenario_needs_an_s3_store(tmp_path: Path) -> None:
    options = ServeBenchOptions(store="posix", scenarios=("none", "slow"), work_dir=tmp_path)
    with pytest.raises(ValueError, match=r"slow scenario .* --store seaweed or moto"):
        run_serve_bench(options)
    assert not any(tmp_path.iterdir())  # refused before anything started


def test_workloads_share_what_they_say_and_nothing_across_repeats() -> None:
    shape = PromptShape(docs=2, doc_tokens=64, questions=3, question_tokens=8, concurrency=4, split_factor=32)
    (sessions,) = regular(shape, 0)
    assert len(sessions) == 6 and {len(s[0]) for s in sessions} == {72}
    waves = same_prefix(shape, 0)  # a wave per document, every client on it at once
    assert [len(w) for w in waves] == [4, 4]
    assert all(len({tuple(s[0][:64]) for s in w}) == 1 and len({tuple(s[0]) for s in w}) == 4 for w in waves)
    (hot_sessions,), prime = hot(shape, 0)
    system = prime[0][0][0][:64]
    assert all(s[0][:64] == system and len(s[0]) == 64 + 32 + 8 for s in hot_sessions)
    assert len({tuple(s[0][64:96]) for s in hot_sessions}) == 6  # each its own group after the system prompt
    assert regular(shape, 1)[0][0][0][:64] not in [s[0][:64] for s in sessions]
    chat = PromptShape(workload="chat", docs=2, doc_tokens=64, questions=3, question_tokens=8, concurrency=2)
    conversation = same_prefix(chat, 0)[0][0]
    assert [len(p) for p in conversation] == [72, 72 + 16 + 8, 72 + 2 * (16 + 8)]
    assert conversation[1][:72] == conversation[0]


def test_cpu_hogs_spin_while_the_block_runs_and_stop_after() -> None:
    with cpu_hogs(2) as pids:
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: no such child any more


def test_summary_and_slowest_requests() -> None:
    def run(ttft: float, loads: float | None) -> dict[str, object]:
        store = dict.fromkeys(("lookups", "lookup_seconds", "lookup_wait_seconds", "hit_tokens", "loaded_tokens",
                               "load_bytes", "store_bytes", "prompt_local_compute", "prompt_local_cache_hit",
                               "prompt_external_kv_transfer"), 1.0)  # fmt: skip
        group = None if loads is None else {"groups": 2, "mean": loads, "max": loads}
        t = {"per_prompt": {"GET": 1.0, "PUT": 0.0, "LIST": 2.0, "HEAD": 0.0}, "fragment_gets": 2,
             "fragment_puts": 0, "errors": 0, "loads_per_group": group, "uploads_per_group": None}  # fmt: skip
        return {"ttft_p50": ttft, "ttft_p90": ttft, "ttft_max": ttft, "tok_s": 1.0, "req_s": 1.0,
                "server_cpu_s": 1.0, "cpu_s_per_gib": None, "store_side_cpu_s": 0.5, "store": store,
                "traffic": t}  # fmt: skip

    summary = summarize([run(0.1, 1.0), run(0.3, 2.0), run(0.2, 1.0)])
    assert summary["ttft_p50"] == {"median": 0.2, "min": 0.1, "max": 0.3, "samples": [0.1, 0.3, 0.2]}
    assert summary["loads_per_group"]["median"] == 1.0 and summary["list_per_prompt"]["max"] == 2.0
    assert summary["store_side_cpu_s"]["median"] == 0.5
    assert "cpu_s_per_gib" not in summary and "uploads_per_group" not in summary  # not every run has them
    assert "loads_per_group" not in summarize([run(0.1, 1.0), run(0.1, None)])
    runs = [[{"ttft_s": 0.5}, {"ttft_s": 0.1}], [{"ttft_s": 0.9}]]
    assert [(r["ttft_s"], r["run"]) for r in slowest(runs, 2)] == [(0.9, 1), (0.5, 0)]
