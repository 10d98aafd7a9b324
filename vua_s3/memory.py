"""Fresh host memory that is cheap to fault in, and cheaper still to have again.

The first write to fresh memory faults it in page by page; with 4 KiB pages that costs
about as much CPU as receiving the bytes (``docs/performance.md``). An anonymous private
mapping advised ``MADV_HUGEPAGE`` is faulted in 2 MiB at a time where the kernel's
transparent huge pages allow it (``enabled`` set to ``always`` or ``madvise``); where
they do not, it is plain anonymous memory, no worse than ``torch.empty``.

Cheaper than any fault is none: when the last tensor on a mapping is gone, the mapping
(already faulted in) waits for the next request of about its size, up to
:data:`IDLE_BYTES` of idle mappings per process. On virtual machines that hand free
2 MiB blocks back to their host, this is what keeps huge pages cheap: a block given back
costs the host's fault as well when it is touched again.

The tensor owns its mapping through a numpy array: ``torch.from_numpy`` holds the
array, every view shares that storage, and only when the last of them is gone does the
array die, handing the mapping back (a finalizer on the array). Nothing else holds the
array, so nothing can hand the mapping back earlier.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import threading
import weakref

import numpy
import torch

HUGE_PAGE = 2 << 20
"""Below this, a mapping cannot hold a huge page: small tensors come from ``torch.empty``."""

IDLE_BYTES = 1 << 30
"""At most this many bytes of idle mappings are kept for reuse; past it the oldest go back
to the kernel."""


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype, *, reuse: bool = True) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor, huge-page backed where the kernel allows,
    on an idle mapping of about its size where there is one (unless ``reuse`` is off)."""
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    raw = _mapped(nbytes, reuse)
    if raw is None:
        return torch.empty(shape, dtype=dtype)
    return raw.view(dtype)[:count].view(shape)


def empty_bytes(nbytes: int, *, reuse: bool = True) -> torch.Tensor:
    """``nbytes`` uninitialized bytes (uint8), as :func:`empty`."""
    return empty((nbytes,), torch.uint8, reuse=reuse)


class _Idle:
    """Mappings whose tensors are all gone, newest last, with their usable sizes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mappings: list[tuple[int, mmap.mmap]] = []
        self._bytes = 0

    def take(self, size: int) -> tuple[int, mmap.mmap] | None:
        """The smallest idle mapping of ``size`` to twice that many usable bytes."""
        with self._lock:
            fits = [i for i, (usable, _) in enumerate(self._mappings) if size <= usable <= 2 * size]
            if not fits:
                return None
            found = self._mappings.pop(min(fits, key=lambda i: self._mappings[i][0]))
            self._bytes -= found[0]
            return found

    def give(self, usable: int, mapping: mmap.mmap) -> None:
        """Keep ``mapping`` for reuse, dropping the oldest past :data:`IDLE_BYTES` (a dropped
        mapping is unmapped when its dying array lets go of it)."""
        with self._lock:
            self._mappings.append((usable, mapping))
            self._bytes += usable
            while self._bytes > IDLE_BYTES:
                dropped, _ = self._mappings.pop(0)
                self._bytes -= dropped

    def bytes(self) -> int:
        with self._lock:
            return self._bytes


_IDLE = _Idle()


def idle_bytes() -> int:
    """Bytes of mappings waiting for reuse in this process."""
    return _IDLE.bytes()


def _mapped(nbytes: int, reuse: bool) -> torch.Tensor | None:
    """At least ``nbytes`` (a whole number of huge pages) of an anonymous mapping, starting
    on a huge-page boundary; ``None`` where no such mapping can be made."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    found = _IDLE.take(size) if reuse else None
    if found is None:
        mapping = _new_mapping(size)
        if mapping is None:
            return None
        found = (size, mapping)
    usable, mapping = found
    array = numpy.frombuffer(mapping, dtype=numpy.uint8)
    finalizer = weakref.finalize(array, _IDLE.give, usable, mapping)
    finalizer.atexit = False  # at exit the tensors may still be alive: nothing to hand back
    whole = torch.from_numpy(array)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + usable]


def _new_mapping(size: int) -> mmap.mmap | None:
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
    return mapping
