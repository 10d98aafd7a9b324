"""The checkpoint ``vua-s3 bench-vllm`` serves: a seeded random Llama, written here, so the bench
downloads nothing and every run computes the same K/V."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 4096
HEAD_DIM = 64


def write_model(directory: Path, layers: int, hidden: int) -> None:
    """A seeded random Llama checkpoint (config.json + model.safetensors): nothing downloaded."""
    heads, kv_heads = max(1, hidden // HEAD_DIM), max(1, hidden // 256)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).div(float(shape[-1]) ** 0.5)

    q, kv = heads * HEAD_DIM, kv_heads * HEAD_DIM
    shapes = {
        "self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (hidden * 2, hidden), "mlp.up_proj": (hidden * 2, hidden),
        "mlp.down_proj": (hidden, hidden * 2),
    }  # fmt: skip
    weights = {
        "model.embed_tokens.weight": rand(VOCAB, hidden),
        "lm_head.weight": rand(VOCAB, hidden),
        "model.norm.weight": torch.ones(hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        weights |= {f"{p}{name}.weight": rand(*shape) for name, shape in shapes.items()}
        weights |= {f"{p}{norm}.weight": torch.ones(hidden) for norm in ("input_layernorm", "post_attention_layernorm")}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
