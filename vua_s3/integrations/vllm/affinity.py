"""Keep the connector's threads off the cores vLLM pins its compute to.

vLLM's CPU worker binds its threads to cores (``VLLM_CPU_OMP_THREADS_BIND``; ``auto``
leaves some for everything else), and every thread started afterwards inherits that
binding: the connector's loop, its copier and the S3 client's event-loop threads would
share the compute core with the forward pass and lengthen every step while they load,
encode or upload. They go to the cores the process could use before vLLM pinned it
instead. A worker that is not pinned (GPU) has none to spare, and nothing changes.
"""

from __future__ import annotations

import contextlib
import os


def spare_cpus() -> frozenset[int]:
    """CPUs the calling (compute) thread is not bound to but its process's parent may use."""
    if not hasattr(os, "sched_getaffinity"):
        return frozenset()
    try:
        allowed = os.sched_getaffinity(os.getppid())
    except OSError:
        allowed = set(range(os.cpu_count() or 1))
    return frozenset(allowed - os.sched_getaffinity(0))


def run_here_on(cpus: frozenset[int]) -> None:
    """Bind the calling thread (and the threads it starts later) to ``cpus``, if any."""
    if cpus:
        with contextlib.suppress(OSError):  # a CPU set the kernel refuses: stay where we are
            os.sched_setaffinity(0, cpus)
