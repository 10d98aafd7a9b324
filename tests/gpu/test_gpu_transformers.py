"""The transformers helper on the device: a random small Llama generates the same tokens with
its prompt's prefix loaded from the store as without, on POSIX and S3."""

from __future__ import annotations

import pytest
import torch
from gpu_cases import DEVICES, same_bits

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM

from vua_s3.integrations.transformers import cached_generate, cached_prefill, kv_from_cache, vua_for_model

pytestmark = pytest.mark.gpu

SPLIT = 16
PROMPT = (
    3 * SPLIT + 14
)  # 14 tokens past the last group: the CPU's bit-identical suffix length (tests/test_transformers.py)
NEW_TOKENS = 12


def small_llama(device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(device)
    model.train(False)
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_cached_and_uncached_generations_are_equal(device: str, posix_or_moto: str) -> None:
    model = small_llama(device)
    ids = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
    expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    with vua_for_model(model, posix_or_moto, split_factor=SPLIT) as vua:
        cold = cached_prefill(model, ids, vua)
        warm = cached_prefill(model, ids, vua)
        first = cached_generate(model, ids, vua, max_new_tokens=NEW_TOKENS, do_sample=False)
        second = cached_generate(model, ids, vua, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert (cold.cached_tokens, cold.stored_groups, warm.cached_tokens) == (0, 3, 3 * SPLIT)
    prefix = [t for layer in kv_from_cache(warm.cache, 3 * SPLIT) for t in layer]
    assert {t.device.type for t in prefix} == {device}
    cold_prefix = [t for layer in kv_from_cache(cold.cache, 3 * SPLIT) for t in layer]
    assert all(same_bits(w, c) for w, c in zip(prefix, cold_prefix, strict=True))
    assert first.device.type == second.device.type == device
    assert torch.equal(first, expected) and torch.equal(second, expected)
