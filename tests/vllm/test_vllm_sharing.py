"""Lookups at arrival, trusted hits, one load and one upload per group: real engines, moto
over HTTP, every store request counted by a fault proxy in the engine's process
(``sharing_run.py``).

With vLLM's prefix cache on: a miss and a hit whose lookups were answered before the
engine stepped are scheduled at the first step, never answered ``None``; two requests
needing the same stored groups at once read each object once (the second waits for the
first's load and finds the groups in the prefix cache); requests on a prefix found
moments ago do not probe it again. With it off: two requests computing the same new
prefix at once upload each object once.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from vua_s3.manifest import is_manifest_key
from vua_s3.testing.moto import EMBEDDED_CREDENTIALS, EmbeddedS3

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-engines")]

HERE = Path(__file__).parent
REPO = HERE.parents[1]
GROUPS, KV_HEADS = 4, 2  # the shared prefix's groups; the tiny model's KV heads


def _run(python: Path, model: Path, out: Path, *flags: str) -> dict[str, Any]:
    with EmbeddedS3() as s3:
        env = os.environ | {
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO),
            "AWS_ACCESS_KEY_ID": EMBEDDED_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": EMBEDDED_CREDENTIALS["aws_secret_access_key"],
        }
        args = [str(python), str(HERE / "sharing_run.py"), str(model), str(s3.port), s3.bucket, "share", str(out)]
        proc = subprocess.run([*args, *flags], capture_output=True, text=True, timeout=900, check=False, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _objects(requests: list[list[str]], method: str) -> Counter[str]:
    """Requests per fragment object (not LISTs, not manifests)."""
    keys = [p.split("/share/", 1)[1] for m, p, q in requests if m == method and "/share/" in p and "list-type" not in q]
    return Counter(k for k in keys if not is_manifest_key(k))


def _lists(requests: list[list[str]]) -> int:
    return sum(1 for m, _, q in requests if m == "GET" and "list-type=2" in q)


def test_lookups_at_arrival_and_one_load_per_group(vllm_python: Path, tiny_llama: Path, tmp_path: Path) -> None:
    report = _run(vllm_python, tiny_llama, tmp_path / "on.json", "--prefix-caching")

    arrival = report["arrival"]  # vLLM suffixes request ids: [id, local tokens, answer]
    answers = sorted((a[0].split("-")[0], a[1], a[2]) for a in arrival["answers"])
    assert answers == [("hit", 0, GROUPS * 64), ("miss", 0, 0)], answers  # answered at the first look
    assert _lists(arrival["requests"]) > 0  # both were looked up (on arrival)
    assert len(_objects(arrival["requests"], "GET")) == GROUPS * KV_HEADS  # the hit was loaded

    shared = report["shared"]
    gets = _objects(shared["requests"], "GET")
    assert len(gets) == GROUPS * KV_HEADS and set(gets.values()) == {1}, gets  # each object read once
    second = [a[1:] for a in shared["answers"] if a[0].startswith("s2")]
    assert any(a[1] is None for a in second) and second[-1] == [GROUPS * 64, 0], second  # waited, then local

    for requests in report["hot"]:  # a prefix found moments ago is trusted: loaded, not probed
        assert _lists(requests) == 0 and len(_objects(requests, "GET")) == GROUPS * KV_HEADS


def test_one_upload_per_group(vllm_python: Path, tiny_llama: Path, tmp_path: Path) -> None:
    report = _run(vllm_python, tiny_llama, tmp_path / "off.json", "--no-prefix-caching")
    puts = _objects(report["uploads"]["requests"], "PUT")
    assert len(puts) == GROUPS * KV_HEADS and set(puts.values()) == {1}, puts
