"""vLLM KV connector (V1 API): vLLM's paged KV cache <-> vua_s3 fragments in S3 or POSIX.

Enable it with::

    --kv-transfer-config '{"kv_connector": "VUAS3Connector", "kv_role": "kv_both",
      "kv_connector_module_path": "vua_s3.integrations.vllm",
      "kv_connector_extra_config": {"url": "s3://bucket/prefix"}}'

(with vua_s3 installed, its ``vllm.general_plugins`` entry point registers the name, so
``kv_connector_module_path`` may be left out).

How it works:

* Scheduler side: ``get_num_new_matched_tokens`` answers with :meth:`AsyncVUA.lookup`
  (one wave of parallel HEADs, per tensor-parallel rank) how many leading prompt tokens
  are stored, in whole groups of ``split_factor`` tokens; it plans loads for hits and
  saves for every prompt group whose KV the step completes.
* Worker side: ``start_load_kv`` fetches the hit with :meth:`AsyncVUA.get_closest` (so
  fragments are checked exactly as for any other reader) and writes it into the paged
  cache through the block table; ``save_kv_layer`` copies each finished group's K/V out
  of the paged cache layer by layer, right after the layer's attention ran;
  ``wait_for_save`` hands the captured groups to a background loop that encodes and
  uploads them, one object per group holding every layer (the shared fragment format,
  readable by ``VUA.get_closest``), so the forward pass never waits for the network.
* Failures of the store never fail a request: a failed probe is a miss; a failed or
  corrupt load is reported to vLLM as invalid blocks, which it recomputes, and the
  recomputed groups are stored again over the bad objects; a failed upload is dropped.
  Each kind of problem is logged once, with its cause.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ...config import VUAConfig
from ...keys import token_ids
from ...logsafe import redact_url
from ...loop import BackgroundLoop, gather_or_cancel
from ...storage import Store, open_store
from ...vua import AsyncVUA, ClosestKV
from .paged import CpuCacheWriter, PagedLayer, kernel_block_ids
from .settings import CONNECTOR_NAME, ConnectorSettings, derive_namespace, request_salt

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# A child of vLLM's logger, so messages share its handlers and format.
log = logging.getLogger(f"vllm.{__name__}")


class _Problems:
    """Logs each kind of store problem once, with its cause; repeats go to debug."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def report(self, what: str, exc: BaseException, consequence: str) -> None:
        key = (what, type(exc).__name__)
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        if first:
            log.warning(
                "%s: %s failed (%s: %s); %s. Further %s errors of this kind are logged at debug level.",
                CONNECTOR_NAME, what, type(exc).__name__, exc, consequence, what,
            )  # fmt: skip
        else:
            log.debug("%s: %s failed again (%s: %s)", CONNECTOR_NAME, what, type(exc).__name__, exc)


# ---------------------------------------------------------------------------
# Scheduler -> worker metadata


@dataclass
class LoadSpec:
    """Load tokens ``[start, len(tokens))`` of a request into ``block_ids``.

    ``tokens`` is the stored prefix (whole groups from token 0, which the key chain
    needs); ``block_ids`` are the request's blocks from token 0 on.
    """

    req_id: str
    tokens: list[int]
    start: int
    block_ids: list[int]
    salt: str | None


@dataclass
class SaveSpec:
    """Store groups ``[first_group, len(tokens) // split_factor)`` of a request."""

    req_id: str
    tokens: list[int]
    first_group: int
    block_ids: list[int]
    salt: str | None


@dataclass
class VUAConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Tracked:
    """Scheduler-side state of one request."""

    request: Request
    salt: str | None
    hit: int
    """Leading prompt tokens found in the store."""
    done: int
    """Leading prompt tokens known stored or already handed to a worker to save."""
    block_ids: list[int] = field(default_factory=list)


@dataclass
class _Capture:
    """One save in progress: a host copy of its groups, filled layer by layer."""

    spec: SaveSpec
    kv: torch.Tensor
    """[layers, 2, heads, tokens, head_dim]"""
    blocks: torch.Tensor
    layers_done: set[str] = field(default_factory=set)


# ---------------------------------------------------------------------------
# The connector


class VUAS3Connector(KVConnectorBase_V1):  # type: ignore[misc]
    """A vLLM V1 KV connector backed by a vua_s3 store (S3-compatible or POSIX)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self._settings = ConnectorSettings.from_extra_config(dict(transfer.kv_connector_extra_config or {}))
        self._block_size: int = vllm_config.cache_config.block_size
        split = self._settings.split_factor
        if split % self._block_size:
            raise ValueError(
                f"{CONNECTOR_NAME}: split_factor {split} must be a multiple of vLLM's block size "
                f"{self._block_size}; set kv_connector_extra_config split_factor accordingly"
            )
        self._load_enabled = bool(transfer.is_kv_consumer)
        self._save_enabled = bool(transfer.is_kv_producer)
        if self._settings.load_failure_policy == "recompute" and transfer.kv_load_failure_policy != "recompute":
            # A cache that cannot deliver is a miss, not an error: have vLLM recompute
            # blocks whose load failed instead of failing the request (its default).
            transfer.kv_load_failure_policy = "recompute"
        self._problems = _Problems(CONNECTOR_NAME)
        self._loop = BackgroundLoop(name="vua-s3-vllm")
        self._store: Store = open_store(self._settings.url)
        self._where = redact_url(self._settings.url)
        # Scheduler side.
        self._lookups: dict[str, _Tracked] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        self._probes: list[AsyncVUA] = []
        # Worker side.
        self._vua: AsyncVUA | None = None
        self._layers: list[PagedLayer] = []
        self._layer_index: dict[str, int] = {}
        self._ratio = 1
        self._device = torch.device("cpu")
        self._captures: list[_Capture] = []
        self._invalid_blocks: set[int] = set()
        self._uploads: set[concurrent.futures.Future[None]] = set()
        self._uploads_lock = threading.Lock()
        if role == KVConnectorRole.SCHEDULER:
            parallel = vllm_config.parallel_config
            self._probes = [
                self._open(derive_namespace(vllm_config, self._settings, tp, pp))
                for pp in range(parallel.pipeline_parallel_size)
                for tp in range(parallel.tensor_parallel_size)
            ]
            log.info(
                "%s: scheduler side on %s, split_factor=%d, namespaces %s",
                CONNECTOR_NAME, self._where, split, [p.config().namespace for p in self._probes],
            )  # fmt: skip

    def _open(self, namespace: str) -> AsyncVUA:
        """An AsyncVUA on the shared store (closed once, by :meth:`shutdown`)."""
        config = VUAConfig(split_factor=self._settings.split_factor, namespace=namespace)
        # strict: the connector reports store failures itself and recovers each request.
        return AsyncVUA(config, self._store, max_inflight=self._settings.max_inflight, strict=True)

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Stored leading prompt tokens beyond ``num_computed_tokens``, in whole groups.

        At least one prompt token is always left to compute (vLLM needs its logits).
        The probe result is kept for the request, so repeated calls cost nothing.
        """
        if not self._load_enabled and not self._save_enabled:
            return 0, False
        tracked = self._lookups.get(request.request_id)
        if tracked is None:
            tracked = self._track(request)
        if not self._load_enabled or tracked.hit <= num_computed_tokens:
            return 0, False
        return tracked.hit - num_computed_tokens, False

    def _track(self, request: Request) -> _Tracked:
        prompt = request.prompt_token_ids
        salt = request_salt(self._settings, request)
        hit = 0
        usable = prompt is not None and not request.mm_features
        if usable and self._load_enabled:
            assert prompt is not None
            split = self._settings.split_factor
            limit = (len(prompt) - 1) // split * split
            if limit > 0:
                hit = self._probe(prompt[:limit], salt)
        tracked = _Tracked(request=request, salt=salt, hit=hit, done=hit if usable else len(prompt or ()))
        self._lookups[request.request_id] = tracked
        return tracked

    def _probe(self, prompt: list[int], salt: str | None) -> int:
        """Stored leading tokens on every rank (one concurrent wave of HEADs); 0 on error."""
        tokens = torch.tensor(prompt, dtype=torch.int64)
        try:
            hits = self._loop.run(gather_or_cancel(*(p.lookup(tokens, salt=salt) for p in self._probes)))
        except Exception as exc:
            self._problems.report(f"lookup in {self._where}", exc, "the request is prefilled as a miss")
            return 0
        return min(hits)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Plan the load of the hit into the request's freshly allocated blocks."""
        if num_external_tokens <= 0:
            return
        tracked = self._lookups[request.request_id]
        assert request.prompt_token_ids is not None
        block_ids = list(blocks.get_block_ids()[0])
        self._pending_loads[request.request_id] = LoadSpec(
            req_id=request.request_id,
            tokens=list(request.prompt_token_ids[: tracked.hit]),
            start=tracked.hit - num_external_tokens,
            block_ids=block_ids[: -(-tracked.hit // self._block_size)],
            salt=tracked.salt,
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's loads, and saves of the prompt groups its forward pass completes."""
        meta = VUAConnectorMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        if not self._save_enabled:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._lookups.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                self._plan_save(tracked, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._lookups.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                tracked.block_ids.extend(new_blocks[0])
            self._plan_save(tracked, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta)
        return meta

    def _plan_save(self, tracked: _Tracked, computed: int, meta: VUAConnectorMetadata) -> None:
        prompt = tracked.request.prompt_token_ids
        assert prompt is not None
        split = self._settings.split_factor
        end = min(computed, len(prompt)) // split * split
        if end <= tracked.done:
            return
        first = tracked.done // split
        per_group = split // self._block_size
        meta.saves.append(
            SaveSpec(
                req_id=tracked.request.request_id,
                tokens=list(prompt[:end]),
                first_group=first,
                block_ids=tracked.block_ids[first * per_group : end // self._block_size],
                salt=tracked.salt,
            )
        )
        tracked.done = end

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Blocks whose load failed are recomputed by vLLM; save them again as they are,
        so a corrupt or lost object is replaced instead of failing every later load."""
        invalid = connector_output.invalid_block_ids
        if not invalid:
            return
        split = self._settings.split_factor
        for tracked in self._lookups.values():
            bad = [i for i, block in enumerate(tracked.block_ids) if block in invalid]
            if bad:
                tracked.done = min(tracked.done, bad[0] * self._block_size // split * split)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request. Its blocks can be freed at once: saves copy their K/V out
        of the paged cache during the step that completes them.

        The request's output carries ``kv_transfer_params["vua_s3"]``: ``hit_tokens``
        (leading prompt tokens found in the store) and ``stored_or_queued_tokens``
        (leading prompt tokens that were stored or queued for upload)."""
        tracked = self._lookups.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        if tracked is None:
            return False, None
        return False, {"vua_s3": {"hit_tokens": tracked.hit, "stored_or_queued_tokens": tracked.done}}

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Map each attention layer's paged cache to K/V views, in model layer order."""
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        config = self._vllm_config
        tp_rank, pp_rank = get_tensor_model_parallel_rank(), get_pp_group().rank_in_group
        namespace = derive_namespace(config, self._settings, tp_rank, pp_rank)
        self._vua = self._open(namespace)
        head_size = config.model_config.get_head_size()
        layers = config.compilation_config.static_forward_context
        self._layers = []
        for name in sorted(kv_caches, key=extract_layer_index):
            module = layers.get(name)
            backend = module.get_attn_backend().get_name() if module is not None else "unknown"
            isa = getattr(module, "isa", None)
            self._layers.append(PagedLayer(name, kv_caches[name], backend, head_size, isa, _cpu_writer(backend)))
        self._layer_index = {layer.name: i for i, layer in enumerate(self._layers)}
        first = self._layers[0]
        self._ratio = kv_caches[first.name].size(0) // self._kv_cache_config.num_blocks
        self._device = first.device
        log.info(
            "%s: worker on %s, namespace %s, %d layers of %s %s KV (%d heads x %d), %d kernel blocks per block",
            CONNECTOR_NAME, self._where, namespace, len(self._layers), first.device, first.dtype,
            first.heads, first.head_size, self._ratio,
        )  # fmt: skip

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Fetch this step's hits and write them into the paged cache before the forward pass."""
        meta = self._connector_metadata
        if not isinstance(meta, VUAConnectorMetadata) or not meta.loads:
            return
        vua = self._vua
        assert vua is not None
        started = time.perf_counter()
        try:
            results = self._loop.run(
                _gather_settled(
                    [vua.get_closest(torch.tensor(s.tokens), self._device, salt=s.salt) for s in meta.loads]
                )
            )
        except Exception as exc:  # the loop itself is gone; treat every load as failed
            results = [exc] * len(meta.loads)
        loaded = 0
        for spec, result in zip(meta.loads, results, strict=True):
            got = self._apply_load(spec, result)
            if got < len(spec.tokens):
                self._invalid_blocks.update(spec.block_ids[max(got, spec.start) // self._block_size :])
            loaded += max(0, got - spec.start)
        log.debug("%s: loaded %d tokens in %.3f s", CONNECTOR_NAME, loaded, time.perf_counter() - started)

    def _apply_load(self, spec: LoadSpec, result: ClosestKV | BaseException | None) -> int:
        """Write what one load delivered; return how many leading tokens are now valid."""
        what, consequence = f"load from {self._where}", "vLLM recomputes the affected tokens"
        if isinstance(result, BaseException):
            self._problems.report(what, result, consequence)
            return 0
        got = 0 if result is None else min(int(result.tokens.numel()), len(spec.tokens))
        if result is not None:
            try:
                self._write(spec, result.data, got)
            except (ValueError, RuntimeError) as exc:  # stored KV that does not fit this model
                self._problems.report(what, exc, consequence)
                return 0
        if got < len(spec.tokens):
            missing = LookupError(f"{len(spec.tokens) - got} of {len(spec.tokens)} tokens missing or unusable")
            self._problems.report(what, missing, consequence)
        return got

    def _write(self, spec: LoadSpec, data: Sequence[tuple[torch.Tensor, torch.Tensor]], end: int) -> None:
        """Copy tokens ``[spec.start, end)`` of a loaded prefix into the request's blocks."""
        start = spec.start
        if end <= start:
            return
        bs = self._block_size
        blocks = kernel_block_ids(spec.block_ids[start // bs : end // bs], self._ratio).to(self._device)
        if len(data) != len(self._layers):
            raise ValueError(f"{CONNECTOR_NAME}: stored KV has {len(data)} layers, the model has {len(self._layers)}")
        for layer, (key, value) in zip(self._layers, data, strict=True):
            paged = [t[0, :, start:end].reshape(layer.heads, -1, layer.block_size, layer.head_size).transpose(0, 1)
                     for t in (key, value)]  # fmt: skip
            layer.scatter(blocks, *paged)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete in :meth:`start_load_kv`: a fragment holds every layer, so
        nothing arrives layer by layer."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Copy this layer's K/V of the groups being saved out of the paged cache."""
        meta = self._connector_metadata
        if not isinstance(meta, VUAConnectorMetadata) or not meta.saves:
            return
        if not self._captures:
            self._captures = [c for c in map(self._begin_capture, meta.saves) if c is not None]
        index = self._layer_index.get(layer_name)
        if index is None:
            return
        for capture in self._captures:
            if layer_name not in capture.layers_done:
                self._capture_layer(capture, index)

    def _begin_capture(self, spec: SaveSpec) -> _Capture | None:
        with self._uploads_lock:
            backlog = len(self._uploads)
        if backlog >= self._settings.max_pending_saves:
            self._problems.report(
                f"upload to {self._where}",
                RuntimeError(f"{backlog} saves still uploading (max_pending_saves={self._settings.max_pending_saves})"),
                "new groups are not stored until the backlog drains",
            )
            return None
        first = self._layers[0]
        num_tokens = len(spec.tokens) - spec.first_group * self._settings.split_factor
        kv = torch.empty(
            (len(self._layers), 2, first.heads, num_tokens, first.head_size),
            dtype=first.dtype,
            pin_memory=first.device.type == "cuda",
        )
        blocks = kernel_block_ids(spec.block_ids, self._ratio).to(self._device)
        return _Capture(spec=spec, kv=kv, blocks=blocks)

    def _capture_layer(self, capture: _Capture, index: int) -> None:
        layer = self._layers[index]
        for slot, paged in enumerate(layer.gather(capture.blocks)):
            tokens = paged.transpose(0, 1).reshape(layer.heads, -1, layer.head_size)
            capture.kv[index, slot].copy_(tokens, non_blocking=True)
        capture.layers_done.add(layer.name)

    def wait_for_save(self) -> None:
        """Finish this step's captures and queue them for upload; never waits on the store."""
        captures, self._captures = self._captures, []
        if not captures:
            return
        for capture in captures:  # layers the forward pass did not report (none, normally)
            for index, layer in enumerate(self._layers):
                if layer.name not in capture.layers_done:
                    self._capture_layer(capture, index)
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        for capture in captures:
            try:
                future = self._loop.submit(self._upload(capture))
            except RuntimeError as exc:
                self._problems.report(f"upload to {self._where}", exc, "the group is not stored")
                continue
            with self._uploads_lock:
                self._uploads.add(future)
            future.add_done_callback(self._upload_done)

    async def _upload(self, capture: _Capture) -> None:
        vua = self._vua
        assert vua is not None
        spec = capture.spec
        ids = token_ids(torch.tensor(spec.tokens, dtype=torch.int64), self._settings.split_factor)
        layers = [(capture.kv[i, 0].unsqueeze(0), capture.kv[i, 1].unsqueeze(0)) for i in range(capture.kv.size(0))]
        groups = range(spec.first_group, len(ids) // self._settings.split_factor)
        kv_start = spec.first_group * self._settings.split_factor
        await vua.put_groups(ids, layers, groups, kv_start=kv_start, salt=spec.salt)

    def _upload_done(self, future: concurrent.futures.Future[None]) -> None:
        with self._uploads_lock:
            self._uploads.discard(future)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._problems.report(f"upload to {self._where}", exc, "the group is not stored")

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose load failed this step; vLLM recomputes them."""
        invalid, self._invalid_blocks = self._invalid_blocks, set()
        return invalid

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Nothing is asynchronous from vLLM's point of view (see :meth:`request_finished`)."""
        return None, None

    def shutdown(self) -> None:
        """Let queued uploads finish (up to ``flush_timeout_s``), then release the store."""
        with self._uploads_lock:
            pending = list(self._uploads)
        if pending:
            _, not_done = concurrent.futures.wait(pending, timeout=self._settings.flush_timeout_s)
            if not_done:
                log.warning(
                    "%s: %d uploads still running after %.0f s at shutdown are abandoned",
                    CONNECTOR_NAME, len(not_done), self._settings.flush_timeout_s,
                )  # fmt: skip
        try:
            self._loop.run(self._store.close())
        except Exception as exc:
            log.debug("%s: closing the store failed: %s", CONNECTOR_NAME, exc)
        self._loop.stop()


async def _gather_settled(coros: Sequence[Any]) -> list[Any]:
    """Every result or exception, so one failed load does not hide the others."""
    return list(await asyncio.gather(*coros, return_exceptions=True))


def _cpu_writer(backend: str) -> CpuCacheWriter | None:
    """vLLM's CPU cache writer, which the CPU backend's layout is learnt from."""
    if backend != "CPU_ATTN":
        return None
    from vllm import _custom_ops as ops

    return ops.cpu_attn_reshape_and_cache  # type: ignore[no-any-return]


def register() -> None:
    """vLLM plugin entry point: make ``"kv_connector": "VUAS3Connector"`` work without
    ``kv_connector_module_path``. Plugins load in every vLLM process, maybe twice."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    with contextlib.suppress(ValueError):  # already registered in this process
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "vua_s3.integrations.vllm", CONNECTOR_NAME)
