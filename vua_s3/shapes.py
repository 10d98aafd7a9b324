"""KV-cache shapes of real models, for demos and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The per-token KV footprint of a model: layers x (K, V) x kv_heads x head_dim."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    def random_kvcache(self, num_tokens: int, batch: int = 1, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A synthetic KV cache of this shape, in the transformers layout."""
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, self.kv_heads, num_tokens, self.head_dim)
        return [
            (torch.randn(shape, generator=gen).to(self.dtype), torch.randn(shape, generator=gen).to(self.dtype))
            for _ in range(self.layers)
        ]


PRESETS = {
    shape.name: shape
    for shape in (
        ModelShape("llama3-8b", layers=32, kv_heads=8, head_dim=128),
        ModelShape("llama3-70b", layers=80, kv_heads=8, head_dim=128),
        ModelShape("llama3.2-1b", layers=16, kv_heads=8, head_dim=64),
        ModelShape("tiny", layers=2, kv_heads=2, head_dim=16),
    )
}
