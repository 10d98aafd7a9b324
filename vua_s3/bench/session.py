"""What every part of one bench run shares: the caches and clients under test, the loop the
async ones run on, and the meter that turns each timed call into a sample."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..loop import BackgroundLoop
from ..storage.s3 import S3Store
from ..sync import VUA
from ..vua import AsyncVUA
from .baseline import Floor
from .clients import CrtClient, TransferClient
from .refresh import RefreshBench
from .report import Sample
from .server import ServerCpu

_T = TypeVar("_T")


class Meter:
    """Times a call: wall and CPU seconds (this process, and the server's where it is a
    local process), and the requests the measured store made."""

    def __init__(self, store: S3Store, server: ServerCpu | None) -> None:
        self._store = store
        self._server = server

    @contextlib.contextmanager
    def measure(self) -> Iterator[Sample]:
        before = Counter(self._store.requests)
        sample = Sample(0.0, 0.0, Counter())
        server = None if self._server is None else self._server.seconds()
        cpu, wall = time.process_time(), time.perf_counter()
        yield sample
        sample.seconds = time.perf_counter() - wall
        sample.cpu = time.process_time() - cpu
        if self._server is not None and server is not None:
            sample.server_cpu = self._server.seconds() - server
        sample.requests = self._store.requests - before


@dataclass
class Session:
    """One run's caches and clients. ``vua`` is measured through its sync face; ``side`` is
    an AsyncVUA on ``loop`` for what only the async API offers (the group loads of the
    vLLM connector), as a serving process holds one."""

    vua: VUA
    side: AsyncVUA
    floor: Floor
    transfer: TransferClient
    crt: CrtClient | None
    loop: BackgroundLoop
    meter: Meter
    step: Callable[[str], None]
    refresh: RefreshBench | None = None
    """A load with refreshes due beside one without (``bench --refresh``)."""
    results: dict[str, list[Sample]] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)

    def record(self, name: str, sample: Sample) -> None:
        self.results.setdefault(name, []).append(sample)
        self.step(name)

    def timed(self, name: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        with self.meter.measure() as sample:
            out = fn(*args, **kwargs)
        self.record(name, sample)
        return out
