"""The vLLM-style load: stored groups copied into a paged KV cache as each arrives, what the
vLLM connector's worker does, beside awscrt into a reused buffer plus the same one copy.

The cache has vLLM's GPU layout (``[blocks, heads, block_size, 2 * head_dim]`` per layer,
K and V side by side), on the host; the copy is the connector's: each group's K and V cut
into blocks and written with one indexed copy per layer and half. A prompt longer than the
cache wraps around it, so the cache's memory stays bounded however long the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..shapes import ModelShape

BLOCK_SIZE = 16
"""vLLM's default block size (smaller where the split factor is not a multiple of it)."""


class PagedCache:
    """A paged KV cache of ``tokens`` positions per layer, zeroed (faulted in) before any clock."""

    def __init__(self, shape: ModelShape, tokens: int, split_factor: int) -> None:
        self._shape = shape
        self._block = math.gcd(BLOCK_SIZE, split_factor)
        self._blocks = max(1, tokens // self._block)
        self._layers = [
            torch.zeros(self._blocks, shape.kv_heads, self._block, 2 * shape.head_dim, dtype=shape.dtype)
            for _ in range(shape.layers)
        ]

    def place(self, number: int, kv: torch.Tensor) -> bool:
        """Group ``number``'s ``kv`` (``[layers, 2, heads, S, head_dim]``, any strides) into its blocks."""
        heads, tokens, head_dim = kv.size(2), kv.size(3), kv.size(4)
        per = tokens // self._block
        blocks = torch.arange(number * per, (number + 1) * per) % self._blocks
        for layer, cache in enumerate(self._layers):
            for half in (0, 1):
                source = kv[layer, half].reshape(heads, per, self._block, head_dim).transpose(0, 1)
                cache[..., half * head_dim : (half + 1) * head_dim][blocks] = source
        return True

    def place_raw(self, buffer: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int], tokens: int) -> None:
        """The same copies from objects (of ``sizes``) that landed whole at ``offsets`` of
        ``buffer``, a group's heads one after another: the reference's one copy. Their first
        bytes are taken for the KV, as the copy's cost does not depend on what they are."""
        s, item = self._shape, self._shape.dtype.itemsize
        heads = s.kv_heads
        for number in range(len(offsets) // heads):
            start, size = offsets[number * heads], sizes[number * heads]
            kv = (
                buffer[start : start + heads * size]
                .view(s.dtype)
                .as_strided(
                    (s.layers, 2, heads, tokens, s.head_dim),
                    (2 * tokens * s.head_dim, tokens * s.head_dim, size // item, s.head_dim, 1),
                )
            )
            self.place(number, kv)


def placements(sizes: Sequence[int], capacity: int, group: int) -> list[int]:
    """Where objects of ``sizes`` land one after another in a buffer of ``capacity`` bytes,
    starting over at its beginning when the next ``group`` objects would not fit (a reused
    ring; a group's objects stay together)."""
    offsets, position = [], 0
    for first in range(0, len(sizes), group):
        batch = sizes[first : first + group]
        if position + sum(batch) > capacity:
            position = 0
        for size in batch:
            offsets.append(position)
            position += size
    return offsets
