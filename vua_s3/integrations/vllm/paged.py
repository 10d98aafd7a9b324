"""vLLM's paged KV cache seen as plain K and V per token: gather for saves, scatter for loads.
Pure: vLLM's CPU cache writer is passed in, never imported here."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from .settings import CONNECTOR_NAME

#: vLLM's ``cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)``.
CpuCacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str], None]


class PagedLayer:
    """One attention layer's paged cache, read and written as plain K and V per token.

    vLLM hands every backend's cache over as a ``[blocks, heads, block_size, content]``
    tensor whose content holds K and V. The GPU backends keep K and V side by side in
    each row (they split the last dimension), which strided views express. The CPU
    backend's own writer lays a block out to suit its kernels, differently per
    instruction set (keys come out transposed on AVX-512, for one), so that layout is
    not assumed: :func:`probe_cpu_layout` asks the writer where each element lands.
    """

    def __init__(
        self,
        name: str,
        kv_cache: torch.Tensor,
        backend: str,
        head_size: int,
        isa: str | None,
        cpu_writer: CpuCacheWriter | None = None,
    ) -> None:
        if kv_cache.dim() != 4 or kv_cache.size(-1) != 2 * head_size:
            raise ValueError(
                f"{CONNECTOR_NAME}: expected a [blocks, heads, block_size, 2*{head_size}] KV cache for {name}, "
                f"got {list(kv_cache.shape)} ({backend}); MLA and packed caches are not supported"
            )
        blocks, self.heads, self.block_size, _ = kv_cache.shape
        self.name, self.head_size, self.dtype, self.device = name, head_size, kv_cache.dtype, kv_cache.device
        self._heads = torch.arange(self.heads, device=self.device)
        self._locations: tuple[torch.Tensor, torch.Tensor] | None = None
        if backend != "CPU_ATTN":
            self._parts = (kv_cache[..., :head_size], kv_cache[..., head_size:])
            return
        if isa is None or cpu_writer is None or not kv_cache[0].is_contiguous() or kv_cache.element_size() == 1:
            raise ValueError(f"{CONNECTOR_NAME}: unsupported CPU KV cache for {name} ({kv_cache.dtype}, isa={isa})")
        flat = kv_cache.view(blocks, self.heads, 2, self.block_size * head_size)
        self._parts = (flat[:, :, 0], flat[:, :, 1])
        key_at, value_at = probe_cpu_layout(self.heads, self.block_size, head_size, self.dtype, isa, cpu_writer)
        self._locations = (key_at.to(self.device), value_at.to(self.device))

    def gather(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``blocks``, each ``[len(blocks), heads, block_size, head_dim]`` (a copy)."""
        if self._locations is None:
            return self._parts[0][blocks], self._parts[1][blocks]
        shape = (-1, self.heads, self.block_size, self.head_size)
        rows, heads = blocks[:, None, None], self._heads[None, :, None]
        key, value = (
            part[rows, heads, at[None, None, :]].view(shape)
            for part, at in zip(self._parts, self._locations, strict=True)
        )
        return key, value

    def scatter(self, blocks: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write K and V (``[len(blocks), heads, block_size, head_dim]`` each) into ``blocks``."""
        for i, src in enumerate((key, value)):
            src = src.to(self.dtype)
            if self._locations is None:
                self._parts[i][blocks] = src
            else:
                index = (blocks[:, None, None], self._heads[None, :, None], self._locations[i][None, None, :])
                self._parts[i].index_put_(index, src.reshape(len(blocks), self.heads, -1))


@functools.lru_cache(maxsize=8)
def probe_cpu_layout(
    heads: int, block_size: int, head_size: int, dtype: torch.dtype, isa: str, writer: CpuCacheWriter
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM's CPU cache writer puts element ``t * head_size + d`` of a block's K and V.

    Writes each position's base-16 digits (exact in every float type) through the
    writer into a one-block cache and reads back where they landed. Returns, for K and
    V, the offset of every element inside a block-head's ``block_size * head_size`` run.
    """
    size = block_size * head_size
    positions = torch.arange(size)
    found = [torch.zeros(size, dtype=torch.int64), torch.zeros(size, dtype=torch.int64)]
    scale = 1
    while scale < size:
        digit = (positions // scale % 16 + 1).to(dtype).view(block_size, 1, head_size).expand(-1, heads, -1)
        cache = torch.zeros(1, heads, 2 * block_size, head_size, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        slots = torch.arange(block_size, dtype=torch.int64)
        writer(digit.contiguous(), digit.contiguous(), key_cache, value_cache, slots, isa)
        for i, part in enumerate((key_cache, value_cache)):
            landed = part[0, 0].reshape(-1).to(torch.int64) - 1
            found[i] += landed * scale
        scale *= 16
    located = []
    for what, position_at in zip(("K", "V"), found, strict=True):
        if not torch.equal(position_at.sort().values, positions):
            raise ValueError(f"{CONNECTOR_NAME}: could not map the CPU KV cache layout ({what}, isa={isa})")
        located.append(position_at.argsort())
    return located[0], located[1]


def kernel_block_ids(block_ids: Sequence[int], ratio: int) -> torch.Tensor:
    """The attention kernel's block indices for the scheduler's ``block_ids``
    (vLLM splits each scheduler block into ``ratio`` kernel blocks, in order)."""
    ids = torch.tensor(block_ids, dtype=torch.int64)
    return (ids.unsqueeze(1) * ratio + torch.arange(ratio)).flatten()
