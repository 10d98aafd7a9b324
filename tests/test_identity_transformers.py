"""The transformers helper's identity: a model loaded again from the same checkpoint reuses its
stored KV; a changed config or changed weights at the same path miss, even under one hand-typed
namespace (the identity is checked on read); the manifest names what the identity covers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vua_s3.cli.main import main
from vua_s3.integrations.transformers import cached_prefill, model_identity, vua_for_model

SPLIT = 16
SHAPE: dict[str, Any] = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                         "max_position_embeddings": 512}  # fmt: skip


def save(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A checkpoint on disk, as models are usually loaded; keeps the old files' times when rewritten."""
    before = {p.name: p.stat() for p in directory.iterdir()} if directory.exists() else {}
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**SHAPE, **overrides)).save_pretrained(directory)
    for path in directory.iterdir():
        if path.name in before:
            os.utime(path, ns=(before[path.name].st_atime_ns, before[path.name].st_mtime_ns))
    return directory


def load(directory: Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager")
    return model.eval()


PROMPT = torch.arange(3, 3 + 2 * SPLIT + 5)


def test_the_same_checkpoint_reuses_a_changed_one_misses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, store = save(tmp_path / "model"), tmp_path / "store"
    first = load(checkpoint)
    with vua_for_model(first, store, split_factor=SPLIT) as vua:
        assert cached_prefill(first, PROMPT, vua).stored_groups == 2
    again = load(checkpoint)  # another process would load the same
    assert model_identity(again) == model_identity(first)
    with vua_for_model(again, store, split_factor=SPLIT) as vua:
        assert cached_prefill(again, PROMPT, vua).cached_tokens == 2 * SPLIT  # the positive control

    changes = {
        "rope_theta": lambda: save(checkpoint, rope_theta=500.0),  # config.json only differs
        "weights": lambda: save(checkpoint, seed=1, rope_theta=500.0),  # same files, sizes, times; other values
    }
    seen, shared = {model_identity(first).identity}, model_identity(first).namespace
    for name, change in changes.items():
        change()
        changed = load(checkpoint)
        derived = model_identity(changed)
        assert derived.identity not in seen, name
        seen.add(derived.identity)
        with vua_for_model(changed, store, split_factor=SPLIT) as vua:
            assert vua.lookup(PROMPT) == 0, name
        # The first model's namespace, typed by hand: the identity refuses its objects.
        vua = vua_for_model(changed, store, split_factor=SPLIT, namespace=shared)
        with vua, caplog.at_level(logging.WARNING, logger="vua_s3"):
            result = cached_prefill(changed, PROMPT, vua, store=False)
        assert result.cached_tokens == 0, name
        assert "written by another model identity" in caplog.text
        caplog.clear()

    assert main(["ls", str(store)]) == 0
    out = capsys.readouterr().out
    # One manifest per identity and namespace: three derived ones, and two more identities in the shared one.
    assert out.count("integration=transformers") == 5
    assert f"model={checkpoint}" in out and "weights.files=" in out


def test_dtype_and_commit_count(tmp_path: Path) -> None:
    checkpoint = save(tmp_path / "model")
    model = load(checkpoint)
    base = model_identity(model)
    assert base.namespace.startswith("LlamaForCausalLM-L2-kv2-d16-float32-")
    assert base.identity.startswith("hf-dynamic1:sha256:")
    assert model_identity(load(checkpoint, torch.bfloat16)).identity != base.identity
    # From the hub: the commit names the weights (here a config that says where it came from).
    model.config._name_or_path, model.config._commit_hash = "org/tiny", "1" * 40
    hub = model_identity(model)
    assert hub.inputs["weights"] == {"commit": "1" * 40} and hub.identity != base.identity
    model.config._commit_hash = "2" * 40
    assert model_identity(model).identity != hub.identity
    built = LlamaForCausalLM(LlamaConfig(**SHAPE))  # no checkpoint: the loaded values still count
    assert model_identity(built).inputs["weights"] == "in memory only"
    json.dumps(model_identity(built).inputs)
