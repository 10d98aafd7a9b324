"""Write a tiny random Llama checkpoint (config.json + model.safetensors) for engine tests,
and LoRA adapters for it.

Weights are seeded and large enough that attention matters: overwrite the KV cache
with noise and the greedy output changes, which is how the tests prove that the KV
a connector loads is really used. About 2 MB; nothing is downloaded.

    python tiny_model.py DIR                      # the checkpoint (seed 0)
    python tiny_model.py DIR --seed 1 --weights   # only model.safetensors, other weights
    python tiny_model.py DIR --seed 1 --lora      # a LoRA adapter on q/k/v
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# head_dim differs from the tests' block size (32), so a transposed block cannot pass.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 256, 2, 4, 2, 64, 512
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_tiny_llama(directory: Path, seed: int = 0, weights_only: bool = False) -> Path:
    """Create the checkpoint in ``directory`` (only its weights file with ``weights_only``) and return it."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, heads, kv_heads, dim = HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).div(float(shape[-1]) ** 0.5)

    tensors = {
        "model.embed_tokens.weight": torch.randn(VOCAB, hidden, generator=gen),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(VOCAB, hidden),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(heads * dim, hidden) * 4,
            p + "self_attn.k_proj.weight": rand(kv_heads * dim, hidden) * 4,
            p + "self_attn.v_proj.weight": rand(kv_heads * dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    directory.mkdir(parents=True, exist_ok=True)
    if not weights_only:
        (directory / "config.json").write_text(json.dumps(CONFIG, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    return directory


def write_lora(directory: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT-format LoRA adapter on every layer's q, k and v projections; its B matrices are
    not zero (as a freshly initialised adapter's are), so it changes K and V."""
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {"q_proj": HEADS * HEAD_DIM, "k_proj": KV_HEADS * HEAD_DIM, "v_proj": KV_HEADS * HEAD_DIM}
    tensors = {}
    for i in range(LAYERS):
        for name, size in out.items():
            p = f"base_model.model.model.layers.{i}.self_attn.{name}."
            tensors[p + "lora_A.weight"] = torch.randn(rank, HIDDEN, generator=gen) / HIDDEN**0.5
            tensors[p + "lora_B.weight"] = torch.randn(size, rank, generator=gen) * 2 / rank**0.5
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(out),
              "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", action="store_true", help="only the weights file")
    parser.add_argument("--lora", action="store_true", help="a LoRA adapter instead of the checkpoint")
    args = parser.parse_args()
    if args.lora:
        write_lora(args.directory, args.seed)
    else:
        write_tiny_llama(args.directory, args.seed, weights_only=args.weights)
