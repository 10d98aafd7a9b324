"""Where loaded objects land: pooled receive buffers, one group's objects staged side by
side for the group API, and one query's output assembled from its objects as each arrives."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence

import torch

from . import fragment, memory
from .loop import in_thread
from .shards import HeadRange

log = logging.getLogger(__name__)

Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def fresh(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pinned: bool) -> torch.Tensor:
    """A new output tensor: page-locked when asked (host memory only), huge-page backed on
    the host otherwise (:mod:`.memory`), plain on a device."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    if pinned:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    return memory.empty(shape, dtype)


class BufferPool:
    """Receive buffers kept for reuse.

    Fresh memory costs a page fault per 4 KiB when first written (on small VMs as much CPU
    as the transfer itself; ``docs/performance.md``); reused memory does not. Buffers are
    pinned when the destination is CUDA, so the host-to-device copy can run
    asynchronously, else huge-page backed (:mod:`.memory`). At most ``keep`` idle
    buffers are kept per size class. Object receive buffers and group stages
    (:class:`Stage`) come from here alike.
    """

    _GRAIN = 1 << 20  # fragments of one model differ by a few header bytes: one class

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self.allocated = 0
        """Buffers allocated so far."""
        self.reused = 0
        """Takes served by an idle buffer (pool hits)."""

    def take(self, size: int, pinned: bool) -> torch.Tensor:
        """At least ``size`` bytes (uint8), reused where an idle buffer of the class waits."""
        capacity = -(-size // self._GRAIN) * self._GRAIN
        free = self._free.get((capacity, pinned))
        if free:
            self.reused += 1
            return free.pop()
        self.allocated += 1
        if pinned:
            return torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        return memory.empty_bytes(capacity)

    def give(self, buf: torch.Tensor, pinned: bool) -> None:
        free = self._free.setdefault((buf.numel(), pinned), [])
        if len(free) < self._keep:
            free.append(buf)

    def idle(self) -> int:
        """How many buffers wait for reuse."""
        return sum(map(len, self._free.values()))


class Assembly:
    """One query's objects, copied into one output tensor as each arrives.

    The representative head of the first group fixes the layout (and, when the query
    asks for every head without knowing how many there are, the head count) and
    allocates the output; every other object waits for it (their downloads do not) and
    ends the prefix if its layout differs. One copy per object into the output: a
    non-blocking host-to-device copy from pinned memory for CUDA.
    """

    def __init__(
        self,
        groups: int,
        size: int,
        device: torch.device,
        heads: HeadRange | None,
        out: torch.Tensor | None = None,
        *,
        pinned: bool | None = None,
        allocate: Allocate | None = None,
    ) -> None:
        """``allocate(shape, dtype)`` makes the output (default: fresh memory on ``device``)."""
        self._groups = groups
        self._size = size
        self._device = device
        self._pinned = device.type == "cuda" if pinned is None else pinned
        self._allocate = allocate or functools.partial(fresh, device=device, pinned=self._pinned)
        self.heads = heads
        """The heads loaded; ``None`` until the first representative tells (every head)."""
        self.kv_heads: int | None = None
        """The model's KV head count, as the first group's representative tells it."""
        self._out: asyncio.Future[torch.Tensor | None] = asyncio.get_running_loop().create_future()
        if out is not None:
            self._out.set_result(out)

    @property
    def pinned(self) -> bool:
        """Receive (and, on the host, output) buffers are page-locked, for async copies to a GPU."""
        return self._pinned

    def output(self) -> torch.Tensor | None:
        """The whole output, ``[layers, 2, heads, tokens, head_dim]``, once placed; else ``None``."""
        return self._out.result() if self._out.done() else None

    @property
    def representative(self) -> int:
        return 0 if self.heads is None else self.heads.representative

    def abandon(self) -> None:
        """The first group's representative is unusable: nothing can be used."""
        if not self._out.done():
            self._out.set_result(None)

    async def layout(self) -> HeadRange | None:
        """The heads loaded, once the layout is fixed; ``None`` if nothing is usable."""
        out = await asyncio.shield(self._out)
        return None if out is None else self.heads

    async def place(self, index: int, frag: fragment.Fragment) -> bool:
        """Copy ``frag`` to group position ``index``; ``False`` (logged) if it does not fit."""
        if not self._out.done() and index == 0 and frag.head == self.representative:
            self.kv_heads = frag.kv_heads
            if self.heads is None:
                self.heads = HeadRange.all(frag.kv_heads)
            layers, two, _, _, head_dim = frag.kv.shape
            shape = (layers, two, self.heads.count, self._size * self._groups, head_dim)
            self._out.set_result(await asyncio.to_thread(self._allocate, shape, frag.kv.dtype))
        out = await asyncio.shield(self._out)
        if out is None or self.heads is None:
            return False
        if (
            frag.kv.dtype != out.dtype
            or [frag.kv.size(0), frag.kv.size(4)] != [out.size(0), out.size(4)]
            or frag.kv_heads != self.heads.total
            or frag.head not in self.heads.heads
        ):
            log.warning(
                "fragment layout changes at group position %d (%s %d layers, head_dim %d, %s -> %s %s, head %d of %d); "
                "prefix ends there",
                index,
                out.dtype,
                out.size(0),
                out.size(4),
                self.heads,
                frag.kv.dtype,
                list(frag.kv.shape),
                frag.head,
                frag.kv_heads,
            )
            return False
        await in_thread(self._copy, out, index, frag.head - self.heads.start, frag.kv)
        return True

    def _copy(self, out: torch.Tensor, index: int, head: int, kv: torch.Tensor) -> None:
        target = out[:, :, head : head + 1, index * self._size : (index + 1) * self._size]
        if out.device.type == "cuda":  # runs only on a GPU: docs/gpu.md
            target.copy_(kv, non_blocking=True)
            torch.cuda.current_stream(out.device).synchronize()  # the pinned buffer goes back to the pool after this
        else:
            target.copy_(kv)

    def result(self, usable: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(K, V)`` views of the output, cut to the first ``usable`` groups."""
        out = self._out.result()
        assert out is not None
        if usable < self._groups:
            cut = out[:, :, :, : usable * self._size]
            out = fresh(tuple(cut.shape), cut.dtype, out.device, self._pinned).copy_(cut)
            if out.device.type == "cuda":  # runs only on a GPU: the copy is done before the caller reads
                torch.cuda.current_stream(out.device).synchronize()
        return [(out[layer, 0].unsqueeze(0), out[layer, 1].unsqueeze(0)) for layer in range(out.size(0))]


class Stage:
    """One group's head objects received side by side in one pooled buffer, each in its
    own slot at a fixed stride, so the group's KV ``[layers, 2, heads, S, head_dim]`` is a
    strided view of the bytes as they arrived: no copy between receiving and the
    caller's own copy (the vLLM connector's into its paged cache). Each head's
    ``[layers, 2, S, head_dim]`` is contiguous in it."""

    _ALIGN = 64  # slots start on cache lines (and on every dtype's alignment)

    def __init__(self, buf: torch.Tensor, heads: HeadRange, size: int) -> None:
        self.buf = buf
        self._heads = heads
        self._size = size
        self._stride = self.stride(size)
        self._bytes = buf.numpy().data

    @classmethod
    def stride(cls, size: int) -> int:
        return -(-size // cls._ALIGN) * cls._ALIGN

    @classmethod
    def capacity(cls, heads: HeadRange, size: int) -> int:
        """The bytes a stage of ``heads`` objects of ``size`` bytes takes."""
        return heads.count * cls.stride(size)

    def slot(self, head: int) -> memoryview:
        """Where KV head ``head``'s object lands."""
        at = (head - self._heads.start) * self._stride
        return self._bytes[at : at + self._size]

    def kv(self, frags: Sequence[fragment.Fragment]) -> torch.Tensor | None:
        """The group's KV over the slots, given each head's decoded object in head order;
        ``None`` (logged) unless every object has the first's layout at the same place in
        its slot (the first's shape, dtype and head count; the heads asked for)."""
        first = frags[0].kv
        base = self.buf.data_ptr()
        offset = first.data_ptr() - base
        item = first.element_size()
        for number, frag in enumerate(frags):
            if (
                frag.kv.dtype != first.dtype
                or frag.kv.shape != first.shape
                or frag.kv_heads != self._heads.total
                or frag.head != self._heads.start + number
                or frag.kv.data_ptr() - base != offset + number * self._stride
                or offset % item
            ):
                log.warning(
                    "fragment layout changes at head %d (%s %s, head %d of %d; the first: %s %s, %s); group unusable",
                    self._heads.start + number,
                    frag.kv.dtype,
                    list(frag.kv.shape),
                    frag.head,
                    frag.kv_heads,
                    first.dtype,
                    list(first.shape),
                    self._heads,
                )
                return None
        layers, two, _, tokens, head_dim = first.shape
        flat = self.buf[: self._heads.count * self._stride].view(first.dtype)
        shape = (layers, two, self._heads.count, tokens, head_dim)
        strides = (two * tokens * head_dim, tokens * head_dim, self._stride // item, head_dim, 1)
        return flat.as_strided(shape, strides, offset // item)
