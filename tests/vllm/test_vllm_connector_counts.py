"""What the connector counts, publishes and frees, against what the store saw: real
engines (TP 1 and 2), moto behind a fault proxy that counts every request
(``connector_run.py``).

* every counter means one thing per engine at TP=2 too: ``stored_groups`` is the groups
  whose every head was PUT, ``loaded_tokens`` the tokens loaded once, ``lookup_heads`` the
  probes the scheduler sent;
* an aborted request's load is cancelled while its GETs are still held, and its blocks
  are freed then (not when the load would have timed out);
* ``reset_prefix_cache(reset_connector=True)``: nothing stored before is reused;
* the engine's ZMQ KV event stream carries one ``BlockStored`` per stored group with the
  medium ``vua_s3``, naming the same blocks as vLLM's own events for those tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from vua_s3.testing.moto import EMBEDDED_CREDENTIALS, EmbeddedS3

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-engines")]

HERE = Path(__file__).parent
REPO = HERE.parents[1]
SPLIT, BLOCK, KV_HEADS = 64, 32, 2
PROMPT_LEN = 150  # two whole groups stored


def _engine(vllm_python: Path, tiny_llama: Path, tmp_path: Path, tp: int) -> tuple[dict[str, Any], list[list[int]]]:
    gen = torch.Generator().manual_seed(7 + tp)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (PROMPT_LEN, PROMPT_LEN, 40)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = os.environ | {
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
        "AWS_ACCESS_KEY_ID": EMBEDDED_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": EMBEDDED_CREDENTIALS["aws_secret_access_key"],
    }
    with EmbeddedS3() as s3:
        files = [str(tmp_path / "prompts.json"), str(tmp_path / "report.json")]
        args = [str(vllm_python), str(HERE / "connector_run.py"), str(tiny_llama), str(s3.port), s3.bucket,
                f"counts{tp}", *files, "--tp", str(tp)]  # fmt: skip
        proc = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    return json.loads((tmp_path / "report.json").read_text()), prompts


def _hits(outputs: list[dict[str, Any]]) -> list[int]:
    return [o["kv_transfer_params"]["vua_s3"]["hit_tokens"] for o in outputs]


@pytest.mark.parametrize("tp", [1, 2])
def test_counters_events_and_aborts_match_the_store(
    vllm_python: Path, tiny_llama: Path, tmp_path: Path, tp: int
) -> None:
    report, (p1, _p2, _short) = _engine(vllm_python, tiny_llama, tmp_path, tp)
    metrics = {name.removeprefix("vllm:vua_s3_"): value for name, value in report["metrics"].items()}
    groups = 2 * 2 + 2  # two prompts, then the first again after the connector's reset
    print(f"TP={tp}: {report['puts']} PUTs, {report['gets']} GETs, {report['lists']} LISTs, {report['heads']} HEADs; "
          f"abort freed after {report['abort']['steps_after_abort']} steps; metrics {metrics}")  # fmt: skip

    # Stored: every head of every group PUT once, and counted once per group.
    assert report["puts"] == groups * KV_HEADS
    assert metrics["stored_groups"] == groups
    # Loaded: the first prompt's two groups, every head GET once, counted once.
    assert _hits(report["load"]) == [2 * SPLIT]
    assert report["gets"] == 2 * KV_HEADS
    assert metrics["loaded_tokens"] == 2 * SPLIT
    assert metrics.get("load_failures", 0) == 0
    # Probes: one LIST per group probed (both heads at once); each process's warm-up is one HEAD.
    assert report["heads"] == 1 + tp
    assert metrics["lookup_heads"] == report["lists"] + 1

    # Aborted while its GETs were held: cancelled, and its blocks freed before any GET answered.
    abort = report["abort"]
    assert abort["held"] and abort["freed"], abort
    assert abort["usage"] == 0
    assert metrics["loads_cancelled"] == 1

    # After the connector's reset, the stored prompt is not reused (and is stored anew).
    assert _hits(report["reset"]) == [0]

    # KV events: one BlockStored per stored group with our medium, naming vLLM's own blocks.
    events = report["events"]
    ours = [e for e in events if e["type"] == "BlockStored" and e["medium"] == "vua_s3"]
    assert len(ours) == groups, sorted({(e["type"], e.get("medium")) for e in events})
    engine_blocks = {
        h for e in events if e["type"] == "BlockStored" and e["medium"] != "vua_s3" for h in e["block_hashes"]
    }
    for event in ours:
        assert len(event["block_hashes"]) == SPLIT // BLOCK and event["block_size"] == BLOCK
        assert set(event["block_hashes"]) <= engine_blocks
    first = [e for e in ours if e["token_ids"] == p1[:SPLIT]]
    second = [e for e in ours if e["token_ids"] == p1[SPLIT : 2 * SPLIT]]
    assert first and second and first[0]["parent_block_hash"] is None
    assert second[0]["parent_block_hash"] == first[0]["block_hashes"][-1]
