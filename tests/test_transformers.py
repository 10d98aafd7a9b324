"""The transformers integration with tiny random Llama models, through moto S3 and POSIX.

Models use eager attention in fp32. Exactness: on this CPU build (MKL sgemm), a linear
layer's row results depend on the number of rows only when it is 1-3, 5-7 or 9-11
(small-M kernels with another summation order), so the 14-token suffixes used here give
bit-identical logits; shorter suffixes are checked against a float bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from conftest import assert_kv_equal, unique_prefix
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from vua_s3 import VUA, VUAConfig
from vua_s3.integrations.transformers import (
    cache_from_kv,
    cached_generate,
    cached_prefill,
    kv_from_cache,
    model_namespace,
    vua_for_model,
)
from vua_s3.manifest import is_manifest_key
from vua_s3.testing.moto import EmbeddedS3

SPLIT = 16
TAIL = 14  # tokens after the last full group: one bit-identical suffix length
ROOT = Path(__file__).resolve().parent.parent


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    shape: dict[str, Any] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        **overrides,
    }
    torch.manual_seed(seed)
    config = LlamaConfig(**shape)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    model.train(False)
    return model


def full_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def test_prefix_plus_suffix_equals_full_prompt(location: str) -> None:
    model = tiny_llama()
    ids = prompt(3 * SPLIT + TAIL)
    reference = full_logits(model, ids)
    with vua_for_model(model, location, split_factor=SPLIT) as vua:
        cold = cached_prefill(model, ids, vua)
        assert (cold.cached_tokens, cold.stored_groups) == (0, 3)
        assert torch.equal(cold.logits, reference)

        warm = cached_prefill(model, ids, vua)
        assert (warm.cached_tokens, warm.stored_groups) == (3 * SPLIT, 0)
        assert (warm.logits - reference[:, 3 * SPLIT :]).abs().max().item() == 0.0
        assert_kv_equal(kv_from_cache(warm.cache), kv_from_cache(cold.cache))

        # A prompt that shares two groups, then diverges, reuses exactly those two.
        other = torch.cat([ids[:, : 2 * SPLIT], prompt(SPLIT + TAIL, seed=2)], dim=1)
        branch = cached_prefill(model, other, vua)
        assert (branch.cached_tokens, branch.stored_groups) == (2 * SPLIT, 1)
        assert torch.equal(branch.logits, full_logits(model, other)[:, 2 * SPLIT :])
        assert vua.lookup(other) == 3 * SPLIT


def test_short_suffix_is_within_float_rounding(tmp_path: Path) -> None:
    """A 1-3 token suffix runs through MKL's small-M kernels: the KV is identical, logits differ by rounding."""
    model = tiny_llama()
    ids = prompt(2 * SPLIT + 3)
    reference = full_logits(model, ids)
    with vua_for_model(model, tmp_path, split_factor=SPLIT) as vua:
        cold = cached_prefill(model, ids, vua)
        warm = cached_prefill(model, ids, vua)
    assert warm.cached_tokens == 2 * SPLIT
    assert_kv_equal(kv_from_cache(warm.cache, 2 * SPLIT), kv_from_cache(cold.cache, 2 * SPLIT))
    # Measured up to 4e-7 on logits of magnitude ~1 (fp32 epsilon is 1.2e-7).
    assert (warm.logits - reference[:, 2 * SPLIT :]).abs().max().item() <= 1e-5
    assert torch.equal(warm.logits[:, -1].argmax(-1), reference[:, -1].argmax(-1))


def test_fully_stored_prompt_runs_its_last_token(tmp_path: Path) -> None:
    model = tiny_llama()
    ids = prompt(2 * SPLIT)
    reference = full_logits(model, ids)
    with vua_for_model(model, tmp_path, split_factor=SPLIT) as vua:
        cached_prefill(model, ids, vua)
        warm = cached_prefill(model, ids, vua)
    assert (warm.cached_tokens, warm.stored_groups) == (2 * SPLIT - 1, 0)
    assert warm.logits.shape == (1, 1, 256)
    assert warm.cache.get_seq_length() == 2 * SPLIT
    assert (warm.logits[:, -1] - reference[:, -1]).abs().max().item() <= 1e-5


def test_generate_from_stored_prefix_matches_plain_generate(location: str) -> None:
    model = tiny_llama()
    ids = prompt(2 * SPLIT + TAIL)
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    with vua_for_model(model, location, split_factor=SPLIT) as vua:
        first = cached_generate(model, ids, vua, max_new_tokens=8, do_sample=False)
        assert vua.lookup(ids) == 2 * SPLIT
        second = cached_generate(model, ids, vua, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_models_of_different_shapes_never_cross(moto_server: EmbeddedS3) -> None:
    prefix = unique_prefix()
    small, wide = tiny_llama(), tiny_llama(num_key_value_heads=4, num_hidden_layers=3)
    ids = prompt(2 * SPLIT + TAIL)
    with (
        vua_for_model(small, moto_server.url(prefix), split_factor=SPLIT) as a,
        vua_for_model(wide, moto_server.url(prefix), split_factor=SPLIT) as b,
    ):
        assert a.config().namespace != b.config().namespace
        cached_prefill(small, ids, a)
        assert b.lookup(ids) == 0
        wide_cold = cached_prefill(wide, ids, b)
        assert wide_cold.cached_tokens == 0 and wide_cold.stored_groups == 2
        small_warm = cached_prefill(small, ids, a)
        wide_warm = cached_prefill(wide, ids, b)
    assert small_warm.cached_tokens == wide_warm.cached_tokens == 2 * SPLIT
    assert torch.equal(small_warm.logits, full_logits(small, ids)[:, 2 * SPLIT :])
    assert torch.equal(wide_warm.logits, full_logits(wide, ids)[:, 2 * SPLIT :])
    keys = [
        o["Key"]
        for o in moto_server.client().list_objects_v2(Bucket=moto_server.bucket, Prefix=f"{prefix}/")["Contents"]
        if not is_manifest_key(o["Key"].removeprefix(f"{prefix}/"))  # one identity manifest per namespace
    ]
    namespaces = {key.split("/")[1] for key in keys}
    assert namespaces == {a.config().namespace, b.config().namespace}
    assert len(keys) == 2 * 2 + 2 * 4  # 2 groups x 2 KV heads (small) + 2 groups x 4 KV heads (wide)


def test_namespace_follows_weights_and_dtype() -> None:
    base = tiny_llama(seed=0)
    assert model_namespace(base) == model_namespace(tiny_llama(seed=0))
    assert model_namespace(base) != model_namespace(tiny_llama(seed=7))  # same config, other weights
    half = model_namespace(tiny_llama(seed=0).bfloat16())
    assert "-bfloat16-" in half and half != model_namespace(base)
    assert model_namespace(base).startswith("LlamaForCausalLM-L2-kv2-d16-float32-")


def test_one_namespace_for_two_shapes_is_refused(tmp_path: Path) -> None:
    small, wide = tiny_llama(), tiny_llama(num_key_value_heads=4)
    ids = prompt(2 * SPLIT + TAIL)
    config = VUAConfig(split_factor=SPLIT, namespace="mixed")
    with VUA(config, tmp_path) as vua:
        cached_prefill(small, ids, vua)
        with pytest.raises(ValueError, match="own namespace"):
            cached_prefill(wide, ids, vua)


def test_sliding_window_models_are_refused() -> None:
    config = MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
    )
    model = MistralForCausalLM(config)
    with pytest.raises(TypeError, match="DynamicSlidingWindowLayer"):
        cache_from_kv([], model.config)


def test_ttft_example_tiny_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "transformers_ttft.py"), "--size", "tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "TTFT warm" in result.stdout
    assert "logits: exact" in result.stdout
