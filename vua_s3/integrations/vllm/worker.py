"""The connector's worker side: loads into and saves out of vLLM's paged cache, off its path.

* Loads run on the connector's loop while the engine keeps stepping: only the groups
  past the local prefix cache are fetched, and each fragment is written into its blocks
  as it arrives. :meth:`WorkerSide.finished_loads` reports a load once it ended, whether
  it worked, failed or its request was aborted; the blocks it could not fill go to vLLM
  in the same pass, and vLLM recomputes them.
* Saves copy each finished group out of the paged cache after the forward pass, on a
  copier thread (a side stream on CUDA), then upload a capture's groups concurrently. The
  backlog is bounded in bytes; the next step's :meth:`WorkerSide.fence` waits for the
  copies (never the uploads) before vLLM can reuse those blocks. Pending uploads are
  flushed at shutdown and at a normal interpreter exit, bounded by ``flush_timeout_s``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
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
    Its copier thread runs on ``cpus`` (:mod:`.affinity`).
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
        self._lock = threading.Lock()
        self._ended: dict[str, set[int]] = {}
        self._invalid: set[int] = set()
        self._copies: list[concurrent.futures.Future[None]] = []
        self._uploads: set[concurrent.futures.Future[None]] = set()
        self._backlog = 0
        self._store_failures: list[str] = []
        self._flush = weakref.finalize(self, _flush, self._uploads, self._lock, flush_timeout_s)
        # At a normal interpreter exit, before the executors the uploads run on are shut down.
        threading._register_atexit(self._flush)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ loads

    def start_loads(self, plan: Plan) -> None:
        for spec in plan.loads:
            future = self._loop.submit(self._load(spec))
            future.add_done_callback(functools.partial(self._load_ended, spec))

    async def _load(self, spec: LoadSpec) -> set[int]:
        """Fetch groups from ``spec.start`` on, each written into its blocks as it lands;
        return the blocks left unfilled."""
        started = time.monotonic()
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
        self._stats.add("loaded_tokens", valid - spec.start)
        self._stats.add("load_bytes", loaded_bytes)
        self._stats.add("load_seconds", time.monotonic() - started)
        if missing:
            self._stats.add("load_failures", -(-missing // split))
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
        for layer, pair in zip(self._layers, kv, strict=True):
            paged = [t.reshape(layer.heads, -1, layer.block_size, layer.head_size).transpose(0, 1) for t in pair]
            layer.scatter(blocks, *paged)

    def _load_ended(self, spec: LoadSpec, future: concurrent.futures.Future[set[int]]) -> None:
        try:
            invalid = future.result()
        except BaseException as exc:  # cancelled at shutdown: nothing it wrote counts
            log.debug("load of %s ended with %r", spec.req_id, exc)
            invalid = set(spec.block_ids[spec.start // self._block_size :])
        with self._lock:
            self._ended[spec.req_id] = invalid

    def finished_loads(self) -> set[str]:
        """Requests whose load ended since the last call; their unfilled blocks are
        returned by the next :meth:`load_errors` (called in the same pass)."""
        with self._lock:
            ended, self._ended = self._ended, {}
            for invalid in ended.values():
                self._invalid |= invalid
        return set(ended)

    def load_errors(self) -> set[int]:
        with self._lock:
            invalid, self._invalid = self._invalid, set()
        return invalid

    # ------------------------------------------------------------------ saves

    def fence(self) -> None:
        """Before a step can overwrite blocks: the copies of earlier captures are done."""
        with self._lock:
            copies, self._copies = self._copies, []
        if copies:
            concurrent.futures.wait(copies)

    def start_saves(self, plan: Plan) -> None:
        """Copy this step's finished groups out (in the background) and queue their upload."""
        if not plan.saves or self._writes is None:
            return
        ready = self._side_ready()
        per_group = self._split // self._block_size
        for spec in plan.saves:
            groups = spec.groups
            if len(spec.block_ids) < len(groups) * per_group:  # never upload what was not copied
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
                with self._lock:
                    self._copies.append(copied)
            try:
                future = self._loop.submit(self._upload(spec, captures))
            except RuntimeError as exc:  # the loop is gone (shutting down)
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
            for slot, paged in enumerate(layer.gather(blocks)):
                tokens = paged.transpose(0, 1).reshape(layer.heads, -1, layer.head_size)
                buf[index, slot].copy_(tokens, non_blocking=self._cuda)

    async def _upload(self, spec: SaveSpec, captures: list[_Capture]) -> None:
        ids = torch.tensor(spec.tokens, dtype=torch.int64)
        try:
            await gather_or_cancel(*(self._upload_group(ids, spec, c) for c in captures))
        finally:
            for capture in captures:
                if capture.copied.done():
                    self._buffers.give(capture.buf)
            with self._lock:
                self._backlog -= len(captures) * self._group_bytes
                backlog = self._backlog
            self._stats.set("backlog_bytes", backlog)

    async def _upload_group(self, ids: torch.Tensor, spec: SaveSpec, capture: _Capture) -> None:
        await asyncio.wrap_future(capture.copied)
        kv = capture.buf
        layers = [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(kv.size(0))]
        group = capture.group
        await self._vua.put_span(
            spec.spans[self._stage], ids, layers, [group], kv_start=group * self._split, heads=self._writes
        )
        self._stats.add("stored_groups")
        self._stats.add("store_bytes", self._group_bytes + self._split * 8)
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
