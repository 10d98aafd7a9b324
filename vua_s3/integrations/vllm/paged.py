"""vLLM's paged KV cache seen as plain K and V per token: gather for saves, scatter for loads.
Pure: vLLM's CPU cache writer is passed in, never imported here."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import torch

from .settings import CONNECTOR_NAME

#: vLLM's ``cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)``.
CpuCacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str], None]
#: A block-head run's stored dimensions and the permutation that reads them in token order.
Tile = tuple[tuple[int, ...], tuple[int, ...]]


class PagedLayer:
    """One attention layer's paged cache, read and written as plain K and V per token.

    vLLM hands every backend's cache over as a ``[blocks, heads, block_size, content]``
    tensor whose content holds K and V. The GPU backends keep K and V side by side in
    each row (they split the last dimension), which strided views express. The CPU
    backend's own writer lays a block out to suit its kernels, differently per
    instruction set (keys come out transposed, for one), so that layout is not assumed:
    :func:`probe_cpu_layout` asks the writer where each element lands, and
    :func:`tile_order` finds the strided view that reads it in token order.

    A copy moves whole blocks (one ``index_select``/``index_copy_`` of contiguous
    records) and reorders them with one strided copy; only a CPU layout no view
    expresses falls back to an index per element.
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
        self._tiles: tuple[Tile, Tile] | None = None
        self._locations: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scratch: torch.Tensor | None = None
        if backend != "CPU_ATTN":
            self._record = kv_cache
            return
        if isa is None or cpu_writer is None or not kv_cache[0].is_contiguous() or kv_cache.element_size() == 1:
            raise ValueError(f"{CONNECTOR_NAME}: unsupported CPU KV cache for {name} ({kv_cache.dtype}, isa={isa})")
        self._record = kv_cache.view(blocks, self.heads, 2, self.block_size * head_size)
        self._tiles = cpu_tiles(self.heads, self.block_size, head_size, self.dtype, isa, cpu_writer)
        if self._tiles is None:
            key_at, value_at = probe_cpu_layout(self.heads, self.block_size, head_size, self.dtype, isa, cpu_writer)
            self._locations = (key_at.to(self.device), value_at.to(self.device))

    def gather_into(
        self, blocks: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, non_blocking: bool = False
    ) -> None:
        """Copy K and V of ``blocks`` into ``key`` and ``value`` (contiguous, each
        ``[heads, len(blocks) * block_size, head_dim]``, on any device). Calls must not
        overlap: on the CPU they reuse one scratch buffer (the worker's one copier thread
        makes them)."""
        records = self._records(len(blocks))
        torch.index_select(self._record, 0, blocks, out=records)
        for i, out in enumerate((key, value)):
            part = self._part(records, i)
            if part is None:  # untiled CPU layout: an index per element
                assert self._locations is not None
                shape = (len(blocks), self.heads, self.block_size, self.head_size)
                part = records[:, :, i].index_select(-1, self._locations[i]).view(shape)
            tiled = out.view(self.heads, len(blocks), *part.shape[2:])
            tiled.copy_(part.transpose(0, 1), non_blocking=non_blocking)

    def scatter(self, blocks: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write K and V (each ``[heads, len(blocks) * block_size, head_dim]``) into ``blocks``."""
        n = len(blocks)
        records = torch.empty((n, *self._record.shape[1:]), dtype=self.dtype, device=self.device)
        for i, src in enumerate((key, value)):
            part = self._part(records, i)
            if part is None:  # untiled CPU layout: an index per element
                assert self._locations is not None
                flat = src.reshape(self.heads, n, -1).transpose(0, 1).to(self.dtype)
                records[:, :, i].index_copy_(-1, self._locations[i], flat)
            else:
                part.copy_(src.reshape(self.heads, n, *part.shape[2:]).transpose(0, 1))
        self._record.index_copy_(0, blocks, records)

    def _records(self, n: int) -> torch.Tensor:
        """Room for ``n`` blocks' records: on the CPU a buffer kept between calls (fresh
        memory costs page faults on every capture), elsewhere the device's allocator's."""
        shape = (n, *self._record.shape[1:])
        if self.device.type != "cpu":
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        if self._scratch is None or self._scratch.shape != shape:
            self._scratch = torch.empty(shape, dtype=self.dtype)
        return self._scratch

    def _part(self, records: torch.Tensor, i: int) -> torch.Tensor | None:
        """K (``i`` 0) or V of ``records`` as a view in token order, ``[n, heads, *tile]``
        where the tile's dimensions flatten to ``block_size * head_dim`` token by token;
        ``None`` for a CPU layout no view expresses."""
        if self._locations is not None:
            return None
        if self._tiles is None:  # GPU backends: K and V side by side in each row
            return records[..., i * self.head_size : (i + 1) * self.head_size]
        stored, reads = self._tiles[i]
        return records[:, :, i].view(*records.shape[:2], *stored).permute(0, 1, *(2 + r for r in reads))


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


@functools.lru_cache(maxsize=8)
def cpu_tiles(
    heads: int, block_size: int, head_size: int, dtype: torch.dtype, isa: str, writer: CpuCacheWriter
) -> tuple[Tile, Tile] | None:
    """The views that read K and V as vLLM's CPU writer lays them out, in token order;
    ``None`` when no view expresses its layout."""
    key_at, value_at = probe_cpu_layout(heads, block_size, head_size, dtype, isa, writer)
    key, value = (tile_order(at, block_size, head_size) for at in (key_at, value_at))
    return None if key is None or value is None else (key, value)


def tile_order(at: torch.Tensor, block_size: int, head_size: int) -> Tile | None:
    """The strided view that reads a block-head run in token order, when the writer lays
    it out as a transpose of tiles (each of tokens and dimensions split in two, the four
    parts in any order); ``None`` when no such view matches ``at`` (from
    :func:`probe_cpu_layout`: where each element, token by token, is stored)."""
    size = block_size * head_size
    for token_tile in _divisors(block_size):
        for dim_tile in _divisors(head_size):
            logical = (block_size // token_tile, token_tile, head_size // dim_tile, dim_tile)
            for order in itertools.permutations(range(4)):
                stored = tuple(logical[o] for o in order)
                reads = tuple(order.index(d) for d in range(4))
                if torch.equal(torch.arange(size).view(stored).permute(reads).reshape(-1), at):
                    return stored, reads
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def kernel_block_ids(block_ids: Sequence[int], ratio: int) -> torch.Tensor:
    """The attention kernel's block indices for the scheduler's ``block_ids``
    (vLLM splits each scheduler block into ``ratio`` kernel blocks, in order)."""
    ids = torch.tensor(block_ids, dtype=torch.int64)
    return (ids.unsqueeze(1) * ratio + torch.arange(ratio)).flatten()
