"""Expiry by last use: the objects loads read are re-stamped in the background once older
than ``refresh_after``, so a lifecycle rule or ``gc`` that removes objects by last write
removes what nobody has read for that long (``docs/operations.md``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence

from .errors import StoreError
from .presence import KnownPresent
from .storage import ObjectInfo, Store

log = logging.getLogger(__name__)

#: Seconds a refresh waits for the verbs of its cache object to pause; past it, refreshes go
#: one at a time meanwhile (a busy cache must not let what it reads expire).
PATIENCE = 5.0


class Refresher:
    """Re-stamps the head objects of the groups loads used, off the loads' path.

    A load hands over a group's keys (:meth:`used`) and goes on at once; the requests run as
    tasks of its event loop once no verb of the cache object runs (:meth:`busy`),
    at most ``concurrency`` at a time (one at a time after :data:`PATIENCE` seconds of no
    pause), and at most ``backlog`` keys wait for them (a group that does not fit is dropped
    whole: its next hit asks again). A
    group's heads are judged together, by the oldest last write this object's probes saw
    among them: a group known to be younger than ``after`` costs no request. Each key is
    asked about at most once per ``after`` seconds here (``capacity`` keys remembered, the
    least recently used forgotten first); across processes the store's condition (copy only
    if not modified for ``after`` seconds) keeps an object refreshed elsewhere from being
    copied again. Failures are logged and counted, never raised: a refresh only decides
    when an object expires.
    """

    def __init__(
        self,
        store: Store,
        after: float,
        known: KnownPresent,
        *,
        concurrency: int = 4,
        backlog: int = 1024,
        capacity: int = 1 << 16,
    ) -> None:
        self.after = after
        """Seconds; a change applies from the next hit on."""
        self._store = store
        self._known = known
        self._concurrency = concurrency
        self._backlog = backlog
        self._capacity = capacity
        self._asked: OrderedDict[str, float] = OrderedDict()
        """Key -> when (monotonic) it was last asked about or known modified: it is not
        asked about again until ``after`` seconds later."""
        self._waiting: deque[tuple[str, float]] = deque()
        """Keys to ask about, with when (monotonic) they were queued."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._wake: asyncio.TimerHandle | None = None
        self._failing = False
        self.sent = 0
        """Refresh requests sent."""
        self.refreshed = 0
        """Objects re-stamped."""
        self.skipped = 0
        """Requests the store declined: the object was modified since (refreshed by another
        process, rewritten) or is gone."""
        self.failed = 0
        """Requests that failed (logged; the object expires by its last write)."""
        self.dropped = 0
        """Keys not asked about because the backlog was full."""
        self.report: Callable[[str], object] | None = None
        """Told ``"refreshes"`` per request answered (or failed) and ``"refresh_failures"`` per
        failure (the vLLM connector's metric names)."""

    def used(self, keys: Sequence[str]) -> None:
        """The head objects of one group a load just used; returns at once."""
        now = time.monotonic()
        due = [key for key in keys if now - self._asked.get(key, -math.inf) >= self.after]
        if not due:
            return
        infos = [info for info in map(self._known.get, keys) if info is not None]
        age = time.time() - min(info.last_modified for info in infos) if infos else math.inf
        if age < self.after:  # written or refreshed recently: not yet
            self._remember(due, now - age)
            return
        if len(self._waiting) + len(due) > self._backlog:
            self.dropped += len(due)
            return
        self._remember(due, now)
        self._waiting.extend((key, now) for key in due)
        self._start(asyncio.get_running_loop())

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Around each verb of the cache object: refreshes wait until none runs."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy and self._waiting:
                self._start(asyncio.get_running_loop())

    def _remember(self, keys: Sequence[str], when: float) -> None:
        for key in keys:
            self._asked[key] = when
            self._asked.move_to_end(key)
        while len(self._asked) > self._capacity:
            self._asked.popitem(last=False)

    def _start(self, loop: asyncio.AbstractEventLoop, *, waited: bool = False) -> None:
        while self._waiting and len(self._tasks) < self._concurrency:
            if self._busy and not waited:
                patient = self._waiting[0][1] + PATIENCE - time.monotonic()
                if self._tasks or patient > 0:
                    if not self._tasks and self._wake is None:
                        self._wake = loop.call_later(patient, self._woken, loop)
                    return
            task = loop.create_task(self._refresh(self._waiting.popleft()[0]))
            self._tasks.add(task)
            task.add_done_callback(self._finished)
            waited = False  # one at a time while busy

    def _woken(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = None
        self._start(loop)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            self._start(task.get_loop())

    async def _refresh(self, key: str) -> None:
        self.sent += 1
        try:
            done = await self._store.refresh(key, time.time() - self.after)
        except Exception as exc:  # any failure: the object just expires by its last write
            self._remember([key], time.monotonic())
            self.failed += 1
            self._tell("refreshes")
            self._tell("refresh_failures")
            if not self._failing:
                self._failing = True
                level = logging.WARNING if isinstance(exc, StoreError) else logging.ERROR
                log.log(
                    level,
                    "refreshing objects in %s fails (%s): what loads read expires by its last write "
                    "until this is fixed (`vua-s3 doctor` checks the endpoint)",
                    self._store.url,
                    exc,
                    exc_info=not isinstance(exc, StoreError),
                )
            return
        self._remember([key], time.monotonic())  # refreshed, or modified since now - after
        self._tell("refreshes")
        if self._failing:
            self._failing = False
            log.info("refreshing objects in %s works again", self._store.url)
        if not done:
            self.skipped += 1
            return
        self.refreshed += 1
        info = self._known.get(key)
        if info is not None:
            self._known.add(ObjectInfo(key=key, size=info.size, last_modified=time.time()))

    def _tell(self, name: str) -> None:
        if self.report is not None:
            self.report(name)

    async def settle(self) -> None:
        """Start what waits and wait until every refresh asked for so far has been answered."""
        while self._tasks or self._waiting:
            self._start(asyncio.get_running_loop(), waited=True)
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Drop what waits and cancel what is out (a cancelled copy is atomic on the server)."""
        self._waiting.clear()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
