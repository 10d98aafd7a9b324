"""Which KV heads a tensor-parallel rank holds, writes and reads (format version 2).

A group is stored as one object per KV head (``keys.fragment_key``), so the objects do
not depend on the tensor-parallel size of whoever wrote them. This module is the
arithmetic that maps a TP rank onto those objects, following vLLM's split of the KV
heads (``QKVParallelLinear``):

* ``tp_size <= kv_heads`` (``kv_heads % tp_size == 0``): rank ``r`` holds the
  contiguous heads ``[r * kv_heads / tp_size, (r + 1) * kv_heads / tp_size)``;
* ``tp_size > kv_heads`` (``tp_size % kv_heads == 0``): each head is replicated on
  ``tp_size / kv_heads`` consecutive ranks; rank ``r`` holds head
  ``r // (tp_size / kv_heads)`` and only the first rank of each replica set writes it,
  so a replicated head is stored once, with no coordination between ranks.

A reader fetches exactly the objects of its heads; the first head of a range is the
one probed for it (see :func:`HeadRange.representative`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadRange:
    """KV heads ``[start, stop)`` of a model with ``total`` KV heads."""

    start: int
    stop: int
    total: int

    def __post_init__(self) -> None:
        for name in ("start", "stop", "total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"HeadRange.{name} must be an int, got {value!r}")
        if not 0 <= self.start < self.stop <= self.total:
            raise ValueError(
                f"head range [{self.start}, {self.stop}) is not a non-empty range of the model's {self.total} KV heads"
            )

    @classmethod
    def all(cls, total: int) -> HeadRange:
        """Every head of a model with ``total`` KV heads."""
        return cls(0, total, total)

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def heads(self) -> range:
        return range(self.start, self.stop)

    @property
    def representative(self) -> int:
        """The head probed for the whole range: its writer stores it after the others."""
        return self.start

    @property
    def rest(self) -> range:
        """Every head of the range but the representative."""
        return range(self.start + 1, self.stop)


def _check_tp(tp_size: int, rank: int, kv_heads: int) -> None:
    for name, value in (("tp_size", tp_size), ("rank", rank), ("kv_heads", kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if tp_size <= 0 or kv_heads <= 0:
        raise ValueError(f"tp_size and kv_heads must be positive, got tp_size={tp_size}, kv_heads={kv_heads}")
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is not a rank of tensor-parallel size {tp_size}")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"tensor-parallel size {tp_size} neither divides nor is a multiple of {kv_heads} KV heads")


def rank_heads(tp_size: int, rank: int, kv_heads: int) -> HeadRange:
    """The KV heads tensor-parallel ``rank`` of ``tp_size`` holds (what it reads)."""
    _check_tp(tp_size, rank, kv_heads)
    if tp_size <= kv_heads:
        width = kv_heads // tp_size
        return HeadRange(rank * width, (rank + 1) * width, kv_heads)
    head = rank // (tp_size // kv_heads)
    return HeadRange(head, head + 1, kv_heads)


def rank_writes(tp_size: int, rank: int, kv_heads: int) -> HeadRange | None:
    """The KV heads ``rank`` stores, or ``None`` for a rank whose head a lower rank stores."""
    heads = rank_heads(tp_size, rank, kv_heads)
    if tp_size > kv_heads and rank % (tp_size // kv_heads):
        return None
    return heads


class ModelHeads:
    """The model's KV head count as one cache object learnt it (from a put or a load):
    what a query for every head (``heads=None``) means once it is known."""

    def __init__(self) -> None:
        self.total: int | None = None

    def learn(self, total: int | None) -> None:
        if total is not None:
            self.total = total

    def resolve(self, heads: HeadRange | None) -> HeadRange | None:
        """``heads``, or every head of the model once known, else ``None`` (not yet known)."""
        if heads is None and self.total is not None:
            return HeadRange.all(self.total)
        return heads

    def probed(self, heads: HeadRange | None) -> list[int]:
        """The heads a probe requires of each group, the representative first; the
        representative alone while the count is unknown (the loads then verify the rest)."""
        known = self.resolve(heads)
        return [0] if known is None else [known.representative, *known.rest]
