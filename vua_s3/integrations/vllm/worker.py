"""The connector's worker side: loads into and saves out of vLLM's paged cache, off its path.

* Loads run on the connector's loop while the engine keeps stepping: only the groups
  past the local prefix cache are fetched, and each fragment is written into its blocks
  as it arrives. :meth:`WorkerSide.finished` reports a load once it ended, whether it
  worked, failed or was cancelled because its request finished (an abort): a cancelled
  load is reported only once it stopped writing, as vLLM frees the blocks then. The
  blocks a load could not fill go to vLLM in the same pass, and vLLM recomputes them.
* Saves copy each finished group out of the paged cache after the forward pass, on a
  copier thread (a side stream on CUDA), then upload a capture's groups concurrently. The
  backlog is bounded in bytes. Nothing waits for the copies at every step: a running
  request's blocks stay put, a finished request's blocks are held by vLLM until
  :meth:`WorkerSide.finished` reports its copies done, and only a preempted request's
  copies are waited for (:meth:`WorkerSide.flush`), before the step that may reuse its
  blocks. Pending uploads are flushed at shutdown and at a normal interpreter exit,
  bounded by ``flush_timeout_s``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...loop import BackgroundLoop, gather_or_cancel
from ...shards import HeadRange
from ...vua import AsyncVUA
from .affinity import run_here_on
from .paged import PagedLayer, kernel_block_ids
from .plan import LoadSpec, Plan, SaveSpec
from .problems import Problems
from .stats import Recorder
from .uploads import Settled

log = logging.getLogger(f"vllm.{__name__}")


@dataclass
class _Capture:
    """One group being saved: its host copy and the copy's completion."""

    spec: SaveSpec
    group: int
    buf: torch.Tensor
    """[layers, 2, heads, split_factor, head_dim]"""
    copied: concurrent.futures.Future[None]
    started: float


class _HostBuffers:
    """Capture buffers kept for reuse (fresh memory costs page faults); pinned for CUDA."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool, keep: int) -> None:
        self._shape, self._dtype, self._pinned, self._keep = shape, dtype, pinned, keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
        return torch.empty(self._shape, dtype=self._dtype, pin_memory=self._pinned)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


class WorkerSide:
    """Loads and saves for one worker (one tensor/pipeline-parallel rank).

    It reads the objects of the KV heads it holds (``heads``) and writes ``writes``:
    the same heads, or ``None`` on a rank whose replicated head a lower rank writes
    (:func:`vua_s3.shards.rank_writes`), which then captures and uploads nothing.
    Its copier thread runs on ``cpus`` (:mod:`.affinity`). ``counts`` says whether it
    records the counters about requests and groups (one worker per engine does: vLLM sums
    every worker's); each group upload's outcome goes to the scheduler
    (:meth:`take_settled`), which counts a group stored once every writing rank stored it
    and trusts it stored from then on, as it does a lookup's positive answer.
    """

    def __init__(
        self,
        vua: AsyncVUA,
        stage: int,
        heads: HeadRange,
        writes: HeadRange | None,
        layers: Sequence[PagedLayer],
        ratio: int,
        block_size: int,
        loop: BackgroundLoop,
        recorder: Recorder,
        problems: Problems,
        *,
        max_pending_save_bytes: int,
        flush_timeout_s: float,
        where: str,
        cpus: frozenset[int] = frozenset(),
        counts: bool = True,
    ) -> None:
        self._vua = vua
        self._stage = stage
        self._layers = list(layers)
        local = {layer.heads for layer in self._layers}
        if local != {heads.count}:
            raise ValueError(
                f"the paged cache holds {sorted(local)} KV heads per layer, but heads {heads} are {heads.count}"
            )
        if writes is not None and writes != heads:
            raise ValueError(f"a rank writes all the heads it holds ({heads}) or none, not {writes}")
        self._heads, self._writes = heads, writes
        self._ratio = ratio
        self._block_size = block_size
        self._split = vua.config().split_factor
        self._loop = loop
        self._stats = recorder
        self._problems = problems
        self._where = where
        self._max_backlog = max_pending_save_bytes
        first = self._layers[0]
        self._device = first.device
        self._cuda = first.device.type == "cuda"
        shape = (len(self._layers), 2, first.heads, self._split, first.head_size)
        self._group_bytes = shape[0] * 2 * first.heads * self._split * first.head_size * first.dtype.itemsize
        keep = max(1, min(64, max_pending_save_bytes // self._group_bytes))
        self._buffers = _HostBuffers(shape, first.dtype, self._cuda, keep)
        self._copier = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="vua-s3-capture", initializer=run_here_on, initargs=(cpus,)
        )
        # untested: no GPU here
        self._side = torch.cuda.Stream(self._device) if self._cuda else None  # type: ignore[no-untyped-call]
        self._counts = counts
        self._lock = threading.Lock()
        self._loads: dict[str, concurrent.futures.Future[None] | None] = {}
        """Loads in flight (``None`` while being submitted), so a finished request's is cancelled."""
        self._ended: dict[str, set[int]] = {}
        self._cancelled: set[str] = set()
        self._invalid: set[int] = set()
        self._copies: dict[str, list[concurrent.futures.Future[None]]] = {}
        """Per request with saves since it (re)started, its copies not known done."""
        self._held: dict[str, list[concurrent.futures.Future[None]]] = {}
        """Finished requests whose blocks vLLM holds until their copies are done."""
        self._settled: list[Settled] = []
        self._uploads: set[concurrent.futures.Future[None]] = set()
        self._backlog = 0
        self._store_failures: list[str] = []
        self._flush = weakref.finalize(self, _flush, self._uploads, self._lock, flush_timeout_s)
        # At a normal interpreter exit, before the executors the uploads run on are shut down.
        # A private hook, kept deliberately: concurrent.futures registers its own shutdown
        # with it, and those hooks run before ``atexit``'s, so an ``atexit`` handler would
        # flush into executors that no longer take work. No public hook runs that early.
        threading._register_atexit(self._flush)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ loads

    def start_loads(self, plan: Plan) -> None:
        for spec in plan.loads:
            with self._lock:
                self._loads[spec.req_id] = None
            future = self._loop.submit(self._run_load(spec))
            with self._lock:
                if spec.req_id in self._loads:  # not ended already
                    self._loads[spec.req_id] = future

    async def _run_load(self, spec: LoadSpec) -> None:
        """The load, its end recorded on the loop once it really stopped: a cancelled load
        may be mid-write until then (a cancelled future says so at once)."""
        invalid = set(spec.block_ids[spec.start // self._block_size :])  # cancelled: nothing it wrote counts
        try:
            invalid = await self._load(spec)
        finally:
            with self._lock:
                self._loads.pop(spec.req_id, None)
                self._ended[spec.req_id] = invalid

    async def _load(self, spec: LoadSpec) -> set[int]:
        """Fetch groups from ``spec.start`` on, each written into its blocks as it lands;
        return the blocks left unfilled."""
        split, bs = self._split, self._block_size
        first_group = spec.start // split
        loaded_bytes = 0

        def place(number: int, kv: torch.Tensor) -> bool:
            nonlocal loaded_bytes
            lo, hi = max(number * split, spec.start), (number + 1) * split
            try:
                with torch.inference_mode():  # vLLM's cache is an inference tensor
                    self._write(spec.block_ids[lo // bs : hi // bs], kv[:, :, :, lo - number * split :])
            except (ValueError, RuntimeError) as exc:  # stored KV that does not fit this model
                self._problems.report(f"load from {self._where}", exc, "vLLM recomputes the affected tokens")
                return False
            loaded_bytes += kv.numel() * kv.element_size()
            return True

        tokens = torch.tensor(spec.tokens, dtype=torch.int64)
        what, consequence = f"load from {self._where}", "vLLM recomputes the affected tokens"
        try:
            sizes = spec.sizes[self._stage] if self._stage < len(spec.sizes) else None
            groups = await self._vua.load_span(
                spec.spans[self._stage], tokens, place, sizes=sizes, pinned=self._cuda, heads=self._heads,
                held=spec.held[self._stage],
            )  # fmt: skip
        except Exception as exc:
            self._problems.report(what, exc, consequence)
            groups = 0
        valid = max(spec.start, min(spec.end, (first_group + groups) * split))
        missing = spec.end - valid
        self._stats.add("load_bytes", loaded_bytes)  # tokens and failures: the scheduler counts them
        if missing:
            total = spec.end - spec.start
            self._problems.report(what, LookupError(f"{missing} of {total} tokens missing or unusable"), consequence)
        return set(spec.block_ids[valid // bs :])

    def _write(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Copy ``kv`` (``[layers, 2, heads, n, head_dim]``, ``n`` whole blocks from the
        first of ``block_ids``) into those blocks."""
        if kv.size(0) != len(self._layers):
            raise ValueError(f"stored KV has {kv.size(0)} layers, the model has {len(self._layers)}")
        blocks = kernel_block_ids(block_ids, self._ratio).to(self._device)
        if self._cuda:  # untested: no GPU here
            assert self._side is not None
            with torch.cuda.stream(self._side):
                self._scatter(blocks, kv.to(self._device, non_blocking=True))
            self._side.synchronize()  # the pinned buffer goes back to the pool after this
        else:
            self._scatter(blocks, kv)

    def _scatter(self, blocks: torch.Tensor, kv: torch.Tensor) -> None:
        for layer, (key, value) in zip(self._layers, kv, strict=True):
            layer.scatter(blocks, key, value)

    def finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """vLLM's ``get_finished``: ``(sending, recving)``. Loads of the requests that just
        finished are cancelled; ``recving``: requests whose load ended since the last call
        (their unfilled blocks are returned by the next :meth:`load_errors`, called in the
        same pass; a cancelled load's are not: its request is gone). ``sending``: finished
        requests with saves whose copies are done, so vLLM may free their blocks."""
        cancelled = 0
        with self._lock:
            for req_id in finished_req_ids:
                load = self._loads.get(req_id)
                if load is not None and load.cancel():
                    self._cancelled.add(req_id)
                    cancelled += 1
                copies = self._copies.pop(req_id, None)
                if copies is not None:
                    self._held[req_id] = copies
            sending = {req_id for req_id, copies in self._held.items() if all(c.done() for c in copies)}
            for req_id in sending:
                del self._held[req_id]
            ended, self._ended = self._ended, {}
            for req_id, invalid in ended.items():
                if req_id in self._cancelled:
                    self._cancelled.discard(req_id)
                else:
                    self._invalid |= invalid
        if cancelled and self._counts:
            self._stats.add("loads_cancelled", cancelled)
        return sending, set(ended)

    def holds(self) -> bool:
        """Whether finished requests wait for their copies (an idle step may wait a moment)."""
        with self._lock:
            return bool(self._held)

    def load_errors(self) -> set[int]:
        with self._lock:
            invalid, self._invalid = self._invalid, set()
        return invalid

    # ------------------------------------------------------------------ saves

    def flush(self, req_ids: list[str]) -> None:
        """Before a step may reuse the blocks of these (preempted) requests: their copies
        are done. Nothing else is waited for."""
        with self._lock:
            copies = [copy for req_id in req_ids for copy in self._copies.pop(req_id, ())]
        if copies:
            concurrent.futures.wait(copies)

    def _copying(self, req_id: str, copy: concurrent.futures.Future[None] | None) -> None:
        """Remember a copy of ``req_id`` (every rank records the request, copies or not, so
        all report it finished together); done copies are forgotten."""
        with self._lock:
            copies = self._copies.setdefault(req_id, [])
            copies[:] = [c for c in copies if not c.done()]
            if copy is not None:
                copies.append(copy)

    def _settle(self, spec: SaveSpec, groups: range, stored: dict[int, int]) -> None:
        """``stored``: group -> its object size, for the groups uploaded."""
        with self._lock:
            self._settled.extend(Settled(spec.req_id, group, self._stage, stored.get(group)) for group in groups)

    def take_settled(self) -> list[Settled]:
        """Group uploads that ended since the last call."""
        with self._lock:
            settled, self._settled = self._settled, []
        return settled

    def start_saves(self, plan: Plan) -> None:
        """Copy this step's finished groups out (in the background) and queue their upload."""
        for spec in plan.saves:
            self._copying(spec.req_id, None)
        if not plan.saves or self._writes is None:
            return
        ready = self._side_ready()
        per_group = self._split // self._block_size
        for spec in plan.saves:
            groups = spec.groups
            if len(spec.block_ids) < len(groups) * per_group:  # never upload what was not copied
                self._settle(spec, groups, {})
                self._problems.report(
                    f"upload to {self._where}",
                    ValueError(f"{len(spec.block_ids)} blocks for {len(groups)} groups of request {spec.req_id}"),
                    "the groups are not stored",
                )
                continue
            size = len(groups) * self._group_bytes
            with self._lock:
                full = self._backlog + size > self._max_backlog and not spec.repair
                if not full:
                    self._backlog += size
                backlog = self._backlog
            if full:
                self._settle(spec, groups, {})
                self._stats.add("dropped_saves")
                self._problems.report(
                    f"upload to {self._where}",
                    RuntimeError(f"{backlog} bytes still uploading (max_pending_save_bytes={self._max_backlog})"),
                    "new groups are not stored until the backlog drains",
                )
                continue
            self._stats.set("backlog_bytes", backlog)
            captures = []
            for i, group in enumerate(groups):
                buf = self._buffers.take()
                ids = spec.block_ids[i * per_group : (i + 1) * per_group]
                copied = self._copier.submit(self._copy_out, ids, buf, ready)
                captures.append(_Capture(spec, group, buf, copied, time.monotonic()))
                self._copying(spec.req_id, copied)
            try:
                future = self._loop.submit(self._upload(spec, captures))
            except RuntimeError as exc:  # the loop is gone (shutting down)
                self._settle(spec, groups, {})
                self._problems.report(f"upload to {self._where}", exc, "the groups are not stored")
                continue
            with self._lock:
                self._uploads.add(future)
            future.add_done_callback(self._upload_done)

    def _side_ready(self) -> torch.cuda.Event | None:
        """On CUDA, the point of the compute stream the copies must wait for."""
        if not self._cuda:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # untested: no GPU here
        event.record(torch.cuda.current_stream(self._device))
        return event

    def _copy_out(self, block_ids: list[int], buf: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        with torch.inference_mode():  # vLLM's cache and the buffers are inference tensors
            blocks = kernel_block_ids(block_ids, self._ratio).to(self._device)
            if ready is None:
                self._gather(blocks, buf)
                return
            assert self._side is not None  # untested: no GPU here
            with torch.cuda.stream(self._side):
                self._side.wait_event(ready)
                self._gather(blocks, buf)
            self._side.synchronize()

    def _gather(self, blocks: torch.Tensor, buf: torch.Tensor) -> None:
        for index, layer in enumerate(self._layers):
            layer.gather_into(blocks, buf[index, 0], buf[index, 1], non_blocking=self._cuda)

    async def _upload(self, spec: SaveSpec, captures: list[_Capture]) -> None:
        ids = torch.tensor(spec.tokens, dtype=torch.int64)
        stored: dict[int, int] = {}
        try:
            await gather_or_cancel(*(self._upload_group(ids, spec, c, stored) for c in captures))
        finally:
            self._settle(spec, range(spec.first_group, spec.first_group + len(captures)), stored)
            for capture in captures:
                if capture.copied.done():
                    self._buffers.give(capture.buf)
            with self._lock:
                self._backlog -= len(captures) * self._group_bytes
                backlog = self._backlog
            self._stats.set("backlog_bytes", backlog)

    async def _upload_group(self, ids: torch.Tensor, spec: SaveSpec, capture: _Capture, stored: dict[int, int]) -> None:
        await asyncio.wrap_future(capture.copied)
        kv = capture.buf
        layers = [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(kv.size(0))]
        group = capture.group
        (stored[group],) = await self._vua.put_span(
            spec.spans[self._stage], ids, layers, [group], kv_start=group * self._split, heads=self._writes
        )
        self._stats.add("store_bytes", self._group_bytes + self._split * 8)
        if self._counts:  # once per engine; the bytes are every rank's
            self._stats.add("store_seconds", time.monotonic() - capture.started)

    def _upload_done(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._uploads.discard(future)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._stats.add("store_failures")
            with self._lock:
                self._store_failures.append(f"{type(exc).__name__}: {exc}")
            self._problems.report(f"upload to {self._where}", exc, "the groups are not stored")

    def take_store_failures(self) -> list[str]:
        with self._lock:
            failures, self._store_failures = self._store_failures, []
        return failures

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Let queued uploads finish (up to ``flush_timeout_s``)."""
        self._flush()
        self._copier.shutdown(wait=True)


def _flush(uploads: set[concurrent.futures.Future[None]], lock: threading.Lock, timeout: float) -> None:
    """Wait for pending uploads; also runs at a normal interpreter exit (the loop thread
    is a daemon and would otherwise die with them half done)."""
    with lock:
        pending = list(uploads)
    if not pending:
        return
    _, not_done = concurrent.futures.wait(pending, timeout=timeout)
    if not_done:
        log.warning("%d uploads still running after %.0f s at exit are abandoned", len(not_done), timeout)
