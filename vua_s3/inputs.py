"""Checks of what callers pass to the verbs: each bad input is refused with an error that
names it, before anything is stored."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import fragment
from .fragment import KVCache
from .shards import HeadRange


def salt(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"salt must be a string or None, got {type(value).__name__}")
    return value


def heads(value: object) -> HeadRange | None:
    if value is not None and not isinstance(value, HeadRange):
        raise TypeError(f"heads must be a vua_s3.HeadRange or None, got {type(value).__name__}")
    return value


def token_rows(tokens: object) -> list[torch.Tensor]:
    """The sequences of a ``put``: one per row of a 2-D tensor, or the single 1-D one."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() == 1:
        return [tokens]
    if tokens.dim() == 2:
        return list(tokens.unbind(0))
    raise ValueError(f"tokens must have shape [n] or [batch, n], got {list(tokens.shape)}")


def kvcache(kv: KVCache, rows: list[torch.Tensor]) -> None:
    """Raise a clear error unless ``kv`` matches the token batch and is storable."""
    if isinstance(kv, torch.Tensor) or not isinstance(kv, Sequence) or not kv:
        raise TypeError("kvcache must be a non-empty list over layers of (K, V) tensor pairs")
    batch, seq_len = len(rows), rows[0].numel()
    first: torch.Tensor | None = None
    for layer, pair in enumerate(kv):
        if not isinstance(pair, Sequence) or len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
            raise TypeError(f"kvcache[{layer}] must be a (K, V) pair of tensors")
        for name, t in zip("KV", pair, strict=True):
            if t.dim() != 4:
                raise ValueError(
                    f"kvcache[{layer}] {name} must be [batch, heads, seq_len, head_dim], got {list(t.shape)}"
                )
            if t.size(0) != batch:
                raise ValueError(f"kvcache[{layer}] {name} has batch {t.size(0)} but tokens have {batch} sequence(s)")
            if t.size(2) < seq_len:  # longer is fine: the first seq_len positions are stored
                raise ValueError(
                    f"kvcache[{layer}] {name} has seq_len {t.size(2)} but tokens have {seq_len}: "
                    "it must cover every token"
                )
            if first is None:
                first = t
                fragment.dtype_name(t.dtype)
            elif (t.size(1), t.size(3), t.dtype, t.device) != (first.size(1), first.size(3), first.dtype, first.device):
                raise ValueError(
                    f"kvcache[{layer}] {name} is {t.dtype} {list(t.shape)} on {t.device}; every K and V must match "
                    f"layer 0's heads, head_dim, dtype and device ({first.dtype} {list(first.shape)} on {first.device})"
                )


def held_heads(kv: KVCache, value: object) -> HeadRange:
    """The KV heads ``kv`` holds: ``value`` checked against its shape, or all of them."""
    held = kv[0][0].size(1)
    if value is None:
        return HeadRange.all(held)
    range_ = heads(value)
    assert range_ is not None
    if range_.count != held:
        raise ValueError(f"kvcache holds {held} KV heads but heads={range_} names {range_.count}")
    return range_
