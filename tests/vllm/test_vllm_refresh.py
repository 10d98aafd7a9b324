"""Expiry by last use in real vLLM engines (POSIX store, file times set back instead of waiting).

Engine A stores a hot prompt and a cold one. Their fragments are made two hours old.
Engine B, with ``refresh_after`` of an hour in ``kv_connector_extra_config``, reads the hot
prompt: its fragments are re-stamped (counted in the connector's ``refreshes`` metric, no
failures), the cold ones keep their age, and ``gc --older-than 1h`` then removes exactly
the cold prompt's fragments.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from vua_s3 import VUAConfig
from vua_s3.ops.gc import gc

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-engines")]

HERE = Path(__file__).parent
SPLIT = 64
STORED = 128  # of a 150-token prompt: two whole groups (vLLM computes the last token)


def run(python: Path, script: str, *args: str) -> None:
    env = os.environ | {"PYTHONPATH": str(HERE.parents[1]), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [str(python), str(HERE / script), *args], capture_output=True, text=True, timeout=900, check=False, env=env
    )
    assert proc.returncode == 0, f"{script} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"


def test_a_hot_prefix_read_by_another_engine_is_refreshed(vllm_python: Path, tiny_llama: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(23)
    hot, cold = (torch.randint(3, 512, (150,), generator=gen).tolist() for _ in range(2))
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "both.json").write_text(json.dumps([hot, cold]))
    run(vllm_python, "engine_run.py", str(tiny_llama), str(store), str(tmp_path / "both.json"),
        str(tmp_path / "a.json"), "--split-factor", str(SPLIT))  # fmt: skip
    files = sorted(store.rglob("*.safetensors"))
    assert len(files) == 8  # 2 prompts x 2 groups x 2 KV heads
    namespace = files[0].relative_to(store).parts[0]
    config = VUAConfig(split_factor=SPLIT, namespace=namespace)
    prompts = [("hot", hot), ("cold", cold)]
    keys = {name: config.tokens_to_paths(torch.tensor(p[:STORED]), kv_heads=2) for name, p in prompts}
    then = time.time() - 7200
    for path in files:
        os.utime(path, (then, then))

    (tmp_path / "hot.json").write_text(json.dumps([hot]))
    run(vllm_python, "refresh_run.py", str(tiny_llama), str(store), str(tmp_path / "hot.json"),
        str(tmp_path / "b.json"), "3600", "4")  # fmt: skip
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["outputs"][0]["kv_transfer_params"]["vua_s3"]["hit_tokens"] == STORED
    assert b["metrics"].get("vllm:vua_s3_refreshes") == 4, b["metrics"]
    assert b["metrics"].get("vllm:vua_s3_refresh_failures", 0) == 0, b["metrics"]
    ages = {key: time.time() - (store / key).stat().st_mtime for key in keys["hot"] + keys["cold"]}
    assert all(ages[key] < 600 for key in keys["hot"]), ages
    assert all(ages[key] > 7000 for key in keys["cold"]), ages

    report = asyncio.run(gc(str(store), older_than=3600))
    assert report.deleted == 4
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*.safetensors")) == sorted(keys["hot"])
