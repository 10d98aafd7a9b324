"""What ``refresh_after`` costs (``vua-s3 bench --refresh``): a load whose objects are due for
a refresh beside the same load with refreshes off, in the same repeat, and what the refreshes
add in requests and client CPU per hit group."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import asdict
from typing import Any

import aioboto3
import torch

from ..config import VUAConfig
from ..loop import BackgroundLoop
from ..storage.s3 import S3Store
from ..vua import AsyncVUA
from .report import Sample, Stat

#: Seconds: small, so each repeat's objects come due after a short wait.
REFRESH_AFTER = 1.0
#: S3 conditions count whole seconds: objects are waited for until this much older than due.
_MARGIN = 1.1


class RefreshBench:
    """Two caches on their own stores on the bench's loop: one refreshes what it loads."""

    def __init__(
        self, cfg: VUAConfig, url: str, session: aioboto3.Session, loop: BackgroundLoop, options: dict[str, Any]
    ) -> None:
        self._loop = loop
        self._stores = {name: S3Store.from_url(url, session=session) for name in ("off", "on")}
        self._off = AsyncVUA(cfg, self._stores["off"], **options)
        self._on = AsyncVUA(cfg, self._stores["on"], refresh_after=REFRESH_AFTER, **options)
        self._refresher = self._on.refresher
        self._extra_cpu: list[float] = []
        self._copies: list[int] = []

    def measure(self, rows: list[torch.Tensor], salt: str, written: float, repeat: int) -> dict[str, Sample]:
        """One load each way of ``rows`` (stored at ``written``, stamped ``salt``), in alternating
        order; the refreshes the due load left in the background are waited for right after it."""
        time.sleep(max(0.0, written + REFRESH_AFTER + _MARGIN - time.time()))
        samples: dict[str, Sample] = {}
        for name in ("get_off", "get_due") if repeat % 2 == 0 else ("get_due", "get_off"):
            which = "on" if name == "get_due" else "off"
            vua = self._on if which == "on" else self._off
            vua.forget_known()
            samples[name] = self._timed(self._stores[which], vua.get_closest(rows, salt=salt))
            if self._refresher is not None and which == "on":  # before the other load: nothing overlaps
                samples["background"] = self._timed(self._stores["on"], self._refresher.settle())
        copies = sum(samples[name].requests["copy_object"] for name in ("get_due", "background"))
        cpu = samples["get_due"].cpu + samples["background"].cpu - samples["get_off"].cpu
        self._copies.append(copies)
        self._extra_cpu.append(cpu)
        return samples

    def _timed(self, store: S3Store, work: Coroutine[Any, Any, object]) -> Sample:
        before = Counter(store.requests)
        cpu, wall = time.process_time(), time.perf_counter()
        self._loop.run(work)
        return Sample(time.perf_counter() - wall, time.process_time() - cpu, store.requests - before)

    def summary(self, groups: int) -> dict[str, Any]:
        """Per hit group: copies sent and client CPU added (the due load and its background
        refreshes, less the same load with refreshes off), over the repeats."""
        per_group = [cpu / groups for cpu in self._extra_cpu]
        return {
            "refresh_after": REFRESH_AFTER,
            "copies_per_group": [copies / groups for copies in self._copies],
            "cpu_ms_per_group": {k: v * 1e3 for k, v in asdict(Stat.of(per_group)).items() if k != "samples"},
        }

    def close(self) -> None:
        self._loop.run(self._off.close())
        self._loop.run(self._on.close())
