"""A cache that fails closed, in real vLLM engines: whatever changes the K/V of the same tokens
changes where the connector looks, so an engine never loads KV another model computed.

``test_identity_of_resolved_configs``: vLLM's own resolved configurations (no engine): the
tensor-parallel size, block size and attention backend leave the namespace as it is; dtype, KV
dtype, ``hf_overrides``, ``max_model_len`` and the pipeline stage change it; decode context
parallelism and dummy weights are refused, naming the setting, and an engine with dummy weights
does not start.

``test_a_changed_model_reuses_nothing``: one checkpoint in a local directory and one store. An
engine stores prompts (two plain, one with a LoRA adapter) and a restart reuses them whole. Then,
one change at a time, each followed by a process of three engines (with the connector; without
it; with it again):
* the LoRA adapter is replaced under the same name and path (same size and times);
* the weights file is replaced by other seeded weights (same size and times);
* ``rope_theta`` changes in config.json;
* ``hf_overrides`` changes the RoPE base at start-up.
Each time the first engine reuses nothing of what the changed input touches, generates what the
model alone generates (which differs from before the change: the change matters), and the third
engine, an unchanged restart, reuses the whole stored prefix again (the positive control).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-engines")]

HERE = Path(__file__).parent
SPLIT = 64
PROMPT_LEN = 150
STORED = (PROMPT_LEN - 1) // SPLIT * SPLIT  # 128: vLLM computes the last prompt token


def run(python: Path, script: str, *args: str) -> str:
    proc = subprocess.run(
        [str(python), str(HERE / script), *args], capture_output=True, text=True, timeout=900, check=False,
        env=os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(HERE.parents[1])},
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} failed:\n{log[-6000:]}"
    return log


def test_identity_of_resolved_configs(vllm_python: Path, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "identities.json"
    run(vllm_python, "identity_configs.py", str(tiny_llama), str(out))
    report: dict[str, Any] = json.loads(out.read_text())
    base = report["base"]
    assert base["namespaces"][0].startswith(f"{tiny_llama.name}.float32.")
    for same in ("again", "tp2", "block16", "flex_attention"):
        assert report[same] == base, same
    changed = ("bfloat16", "kv_bfloat16", "hf_overrides", "max_model_len")
    identities = {name: report[name]["identities"][0] for name in changed} | {"base": base["identities"][0]}
    assert len(set(identities.values())) == len(identities), identities
    assert [ns.split(".")[2] for ns in report["pp2"]["namespaces"]] == ["pp2r0", "pp2r1"]
    assert len(set(report["pp2"]["identities"]) | {base["identities"][0]}) == 3
    assert "decode_context_parallel_size=2 (--decode-context-parallel-size)" in report["dcp2"]["error"]
    assert "load_format=dummy" in report["dummy"]["error"]
    assert report["base"]["readable"]["weights"]["files"] == 2

    # A real engine refuses at start-up, naming the setting.
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"prompts": [], "phases": [{"name": "dummy", "connector": True, "load_format": "dummy"}]})
    )
    run(vllm_python, "identity_run.py", str(tiny_llama), str(tmp_path / "store"), str(spec), str(out))
    error = json.loads(out.read_text())["dummy"]["error"]
    assert "VUAS3Connector cannot store this engine's KV correctly: load_format=dummy" in error, error


class Store:
    """Engines in processes of their own, on one model directory and one POSIX store."""

    def __init__(self, python: Path, tmp_path: Path) -> None:
        self.python, self.tmp = python, tmp_path
        self.model, self.lora, self.store = tmp_path / "model", tmp_path / "lora", tmp_path / "store"
        self.store.mkdir()
        run(python, "tiny_model.py", str(self.model))
        run(python, "tiny_model.py", str(self.lora), "--lora")
        gen = torch.Generator().manual_seed(9)
        self.prompts = [torch.randint(3, 512, (PROMPT_LEN,), generator=gen).tolist() for _ in range(3)]
        self.runs = 0

    def engines(self, phases: list[tuple[str, bool]], *, lora: bool = False, hf_overrides: Any = None) -> Any:
        spec = {
            "prompts": self.prompts[:2], "lora_prompts": self.prompts[2:],
            "lora": {"name": "sql", "id": 1, "path": str(self.lora)} if lora else None,
            "hf_overrides": hf_overrides, "phases": [{"name": n, "connector": c} for n, c in phases],
        }  # fmt: skip
        self.runs += 1
        spec_path, out = self.tmp / f"spec{self.runs}.json", self.tmp / f"out{self.runs}.json"
        spec_path.write_text(json.dumps(spec))
        run(self.python, "identity_run.py", str(self.model), str(self.store), str(spec_path), str(out))
        return json.loads(out.read_text())

    def replace(self, *args: str) -> None:
        """Rewrite files with tiny_model.py, then set their old times back: the same names, sizes
        and times (a copy that kept them), other bytes."""
        target = self.lora if "--lora" in args else self.model
        before = {p: p.stat() for p in target.iterdir()}
        run(self.python, "tiny_model.py", str(target), *args)
        for path, old in before.items():
            assert path.stat().st_size == old.st_size
            os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))


def tokens(outputs: list[dict[str, Any]]) -> list[list[int]]:
    return [o["tokens"] for o in outputs]


def hits(outputs: list[dict[str, Any]]) -> list[int]:
    assert [o["num_cached_tokens"] for o in outputs] == [o["hit_tokens"] for o in outputs]  # all from the store
    return [o["hit_tokens"] for o in outputs]


CHANGED_THEN_RESTART = [("changed", True), ("model_alone", False), ("restart", True)]


def check_changed(report: dict[str, Any], before: list[list[int]], count: int) -> None:
    """The first ``count`` outputs' prompts were stored before a change that touches them."""
    changed, alone, restart = report["changed"], report["model_alone"], report["restart"]
    assert hits(changed)[:count] == [0] * count, "KV stored before the change must not be reused"
    assert tokens(changed) == tokens(alone), "the engine must generate what the model alone does"
    assert tokens(alone)[:count] != before[:count], "the change must matter to the model"
    assert hits(restart) == [STORED] * len(restart), "an unchanged restart reuses the whole stored prefix"
    assert tokens(restart) == tokens(alone)


def test_a_changed_model_reuses_nothing(vllm_python: Path, tmp_path: Path) -> None:
    store = Store(vllm_python, tmp_path)
    first = store.engines([("store", True), ("restart", True)], lora=True)
    assert hits(first["store"]) == [0, 0, 0]
    assert hits(first["restart"]) == [STORED] * 3 and tokens(first["restart"]) == tokens(first["store"])
    assert tokens(first["store"])[2] != tokens(first["store"])[0]

    # LoRA: another adapter under the same name and path; the plain prompts still hit.
    store.replace("--lora", "--seed", "1")
    lora = store.engines(CHANGED_THEN_RESTART, lora=True)
    assert hits(lora["changed"]) == [STORED, STORED, 0]
    changed_lora = {k: v[2:] for k, v in lora.items()}
    check_changed(changed_lora, tokens(first["store"])[2:], 1)
    assert tokens(lora["changed"])[:2] == tokens(first["store"])[:2]

    # New weights at the same path, same size and times.
    store.replace("--weights", "--seed", "1")
    weights = store.engines(CHANGED_THEN_RESTART)
    check_changed(weights, tokens(first["store"])[:2], 2)

    # rope_theta in config.json.
    config = json.loads((store.model / "config.json").read_text())
    config["rope_theta"] = 500.0
    (store.model / "config.json").write_text(json.dumps(config, indent=1))
    rope = store.engines(CHANGED_THEN_RESTART)
    check_changed(rope, tokens(weights["model_alone"]), 2)

    # hf_overrides, given at start-up only.
    overrides = {"rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"}}
    overridden = store.engines(CHANGED_THEN_RESTART, hf_overrides=overrides)
    check_changed(overridden, tokens(rope["model_alone"]), 2)
