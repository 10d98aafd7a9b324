"""Fresh host memory that is cheap to fault in.

The first write to fresh memory faults it in page by page; with 4 KiB pages that costs
about as much CPU as receiving the bytes (``docs/performance.md``). An anonymous private
mapping advised ``MADV_HUGEPAGE`` is faulted in 2 MiB at a time where the kernel's
transparent huge pages allow it (``enabled`` set to ``always`` or ``madvise``); where
they do not, it is plain anonymous memory, no worse than ``torch.empty``.

The tensor owns its mapping: ``torch.frombuffer`` holds a reference to the ``mmap``
object, every view shares that storage, and the mapping is unmapped when the last of
them is gone. Nothing else holds the ``mmap`` object, so nothing can unmap it earlier.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import torch

HUGE_PAGE = 2 << 20
"""Below this, a mapping cannot hold a huge page: small tensors come from ``torch.empty``."""


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor, huge-page backed where the kernel allows."""
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    raw = _mapped(nbytes)
    if raw is None:
        return torch.empty(shape, dtype=dtype)
    return raw.view(dtype)[:count].view(shape)


def empty_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` uninitialized bytes (uint8), as :func:`empty`."""
    return empty((nbytes,), torch.uint8)


def _mapped(nbytes: int) -> torch.Tensor | None:
    """At least ``nbytes`` (a whole number of huge pages) of a fresh anonymous mapping,
    starting on a huge-page boundary; ``None`` where no such mapping can be made."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    try:
        # One huge page more than needed: the start is moved to a boundary (kernels since
        # 6.7 align large anonymous mappings themselves; the spare page is never touched).
        mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):  # not POSIX, or no address space left
        return None
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages: plain memory
            mapping.madvise(advice)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + size]
