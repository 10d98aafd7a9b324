"""vLLM KV connector (V1 API): vLLM's paged KV cache <-> vua_s3 fragments in S3 or POSIX.

Enable it with::

    --kv-transfer-config '{"kv_connector": "VUAS3Connector", "kv_role": "kv_both",
      "kv_connector_module_path": "vua_s3.integrations.vllm",
      "kv_connector_extra_config": {"url": "s3://bucket/prefix"}}'

(with vua_s3 installed, its ``vllm.general_plugins`` entry point registers the name, so
``kv_connector_module_path`` may be left out).

The store never holds up the engine: lookups run on the connector's loop while vLLM
schedules other requests (:mod:`.scheduler`), hits load while it keeps stepping and
saves are copied out and uploaded behind it (:mod:`.worker`). A failing store costs a
miss: failed lookups are misses and open a breaker that sends new requests straight to
prefill for a while; blocks that fail to load are recomputed by vLLM and stored again;
failed uploads are dropped. Each kind of problem is logged once, with its cause. With
vLLM's KV events on, every group stored is published as a ``BlockStored`` event whose
medium names this tier (``kv_events_medium``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_events import BlockStored, KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from ...config import VUAConfig
from ...logsafe import redact_url
from ...loop import BackgroundLoop
from ...manifest import Manifest, write_manifest
from ...shards import HeadRange, rank_heads, rank_writes
from ...storage import Store, open_store
from ...vua import AsyncVUA
from .affinity import run_here_on, spare_cpus
from .breaker import Breaker
from .identity import check_supported, derive_identity
from .metrics import VUAS3PromMetrics, VUAS3Stats
from .paged import CpuCacheWriter, PagedLayer
from .plan import Plan
from .problems import Problems
from .scheduler import SchedulerSide
from .settings import CONNECTOR_NAME, ConnectorSettings
from .stats import Recorder
from .uploads import Settled, Uploads
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# A child of vLLM's logger, so messages share its handlers and format.
log = logging.getLogger(f"vllm.{__name__}")

#: How long an idle step that only waits for upload reports sleeps (seconds).
_IDLE_WAIT = 0.005


@dataclass
class VUAConnectorMetadata(KVConnectorMetadata, Plan):  # type: ignore[misc]
    """One step's :class:`~.plan.Plan`, in the type vLLM passes to workers."""


@dataclass
class VUAWorkerMetadata(KVConnectorWorkerMetadata):  # type: ignore[misc]
    """What the workers saw this step: store failures (they open the scheduler's breaker)
    and the group uploads that ended, per writing rank."""

    store_failures: list[str] = field(default_factory=list)
    settled: list[Settled] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, VUAWorkerMetadata):
            self.store_failures.extend(other.store_failures)
            self.settled.extend(other.settled)
        return self


class VUAS3Connector(KVConnectorBase_V1):  # type: ignore[misc]
    """A vLLM V1 KV connector backed by a vua_s3 store (S3-compatible or POSIX)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self._settings = ConnectorSettings.from_extra_config(dict(transfer.kv_connector_extra_config or {}))
        check_supported(vllm_config, kv_cache_config)
        self._block_size: int = vllm_config.cache_config.block_size
        split = self._settings.split_factor
        if split % self._block_size:
            raise ValueError(
                f"{CONNECTOR_NAME}: split_factor {split} must be a multiple of vLLM's block size "
                f"{self._block_size}; set kv_connector_extra_config split_factor accordingly"
            )
        if self._settings.load_failure_policy == "recompute" and transfer.kv_load_failure_policy != "recompute":
            # A cache that cannot deliver is a miss, not an error: have vLLM recompute
            # blocks whose load failed instead of failing the request (its default).
            transfer.kv_load_failure_policy = "recompute"
        self._where = redact_url(self._settings.url)
        self._problems = Problems(log, CONNECTOR_NAME)
        self._stats = Recorder()
        self._loop = BackgroundLoop(name="vua-s3-vllm")
        self._store = open_store(self._settings.url)
        self._breaker = Breaker(
            log, CONNECTOR_NAME, self._where, self._settings.breaker_backoff_s, self._settings.breaker_max_backoff_s,
            self._stats,
        )  # fmt: skip
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._probes: list[AsyncVUA] = []
        self._probed = 0
        events = vllm_config.kv_events_config
        self._events_on = bool(events is not None and events.enable_kv_cache_events)
        self._requests: dict[str, Request] = {}
        """Live requests, while KV events are on: their block hashes name the groups stored."""
        self._events: list[KVCacheEvent] = []
        if role == KVConnectorRole.SCHEDULER:
            parallel = vllm_config.parallel_config
            # One probe per pipeline stage serves every tensor-parallel rank: its objects do
            # not depend on the TP size, every head of a group has the same size, and one
            # request per group checks every head of the model (all ranks load).
            stages = [derive_identity(vllm_config, self._settings, pp) for pp in range(parallel.pipeline_parallel_size)]
            probes = self._probes = [self._open(stage, self._settings.lookup_timeout_s) for stage in stages]
            tp, kv_heads = parallel.tensor_parallel_size, vllm_config.model_config.get_total_num_kv_heads()
            writers = sum(rank_writes(tp, rank, kv_heads) is not None for rank in range(tp))
            self._uploads: Uploads[KVCacheEvent] = Uploads(writers, parallel.pipeline_parallel_size)
            # Opening the store's client (sessions, credentials, first connection) costs a
            # noticeable moment; do it now, not in the first request's lookup.
            self._loop.submit(_warm_up(probes[0]))
            if transfer.is_kv_producer:
                self._loop.submit(_write_manifests(self._store, stages))
            self._scheduler = SchedulerSide(
                self._settings, probes, self._loop, self._breaker, self._stats, self._block_size,
                heads=HeadRange.all(vllm_config.model_config.get_total_num_kv_heads()),
                load=bool(transfer.is_kv_consumer), save=bool(transfer.is_kv_producer), where=self._where,
                share_loads=bool(vllm_config.cache_config.enable_prefix_caching),
            )  # fmt: skip
            log.info(
                "%s: scheduler side on %s, split_factor=%d, namespaces %s",
                CONNECTOR_NAME, self._where, split, [p.config().namespace for p in probes],
            )  # fmt: skip

    def _open(self, stage: Manifest, timeout: float) -> AsyncVUA:
        """An AsyncVUA on the shared store (closed once, by :meth:`shutdown`)."""
        config = VUAConfig(split_factor=self._settings.split_factor, namespace=stage.namespace, identity=stage.identity)
        # strict: the connector reports store failures itself and recovers each request.
        vua = AsyncVUA(
            config, self._store, max_inflight=self._settings.max_inflight, strict=True, timeout=timeout,
            refresh_after=self._settings.refresh_after,
        )  # fmt: skip
        if vua.refresher is not None:
            vua.refresher.report = self._stats.add  # refreshes, refresh_failures
        return vua

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache: a save that never happens is a future miss, not lost data."""
        return False

    # ------------------------------------------------------------------ scheduler side

    def on_new_request(self, request: Request) -> None:
        """Start the request's lookup as it arrives, so it is usually answered by the time
        the scheduler first looks at the request."""
        assert self._scheduler is not None
        self._scheduler.arrived(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Stored prompt tokens past the local prefix cache, in whole groups; ``None``
        while the lookup is still out or another request loads the same groups (vLLM asks
        again on a later step)."""
        assert self._scheduler is not None
        if self._events_on:
            self._requests[request.request_id] = request
        return self._scheduler.matched(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.allocated(request, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        plan = self._scheduler.plan(scheduler_output)
        if not scheduler_output.total_num_scheduled_tokens and self._uploads:
            time.sleep(_IDLE_WAIT)  # stepping only to hear of uploads: do not spin
        for spec in plan.saves:
            request = self._requests.get(spec.req_id)
            for group, key in zip(spec.groups, spec.spans[0].digests, strict=True):
                event = self._stored_event(request, group) if request is not None else None
                self._uploads.queued(spec.req_id, group, key, event)
        return VUAConnectorMetadata(loads=plan.loads, saves=plan.saves, preempted=plan.preempted)

    def _stored_event(self, request: Request, group: int) -> BlockStored | None:
        """vLLM's event for one stored group: its blocks by vLLM's own block hashes (what
        routers index the GPU tier by), chained to the block before it."""
        split, size = self._settings.split_factor, self._block_size
        per_group = split // size
        hashes = list(request.block_hashes[group * per_group : (group + 1) * per_group])
        if len(hashes) < per_group:
            return None
        parent = request.block_hashes[group * per_group - 1] if group else None
        lora = request.lora_request
        return BlockStored(
            block_hashes=[maybe_convert_block_hash(h) for h in hashes],
            parent_block_hash=None if parent is None else maybe_convert_block_hash(parent),
            token_ids=list(request.prompt_token_ids or ())[group * split : (group + 1) * split],
            block_size=size,
            lora_id=None if lora is None else lora.adapter_id,
            medium=self._settings.kv_events_medium,
            lora_name=None if lora is None else lora.name,
            group_idx=0,
        )

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Loads the workers finished (blocks they could not fill are recomputed by
        vLLM and stored again); groups stored (trusted from now on, like a lookup's hits);
        upload failures open the breaker."""
        assert self._scheduler is not None
        self._scheduler.loads_reported(connector_output.finished_recving or (), connector_output.invalid_block_ids)
        self._scheduler.sent(connector_output.finished_sending or ())
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, VUAWorkerMetadata):
            return
        if meta.store_failures:
            self._breaker.failed(f"upload to {self._where}", meta.store_failures[0])
        stored, events = self._uploads.settled(meta.settled)
        if stored:
            self._stats.add("stored_groups", len(stored))
            self._scheduler.uploaded(stored)
        self._events.extend(events)

    def has_pending_push_work(self) -> bool:
        """While uploads are out, vLLM keeps stepping (idle steps wait a moment), so the
        workers' reports of them arrive: ``stored_groups`` and the KV events are not held
        back until the next request."""
        pending = self._scheduler is not None and bool(self._uploads)
        return pending

    def take_events(self) -> list[KVCacheEvent]:
        """``BlockStored`` for the groups every writing rank stored since the last call."""
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> bool:
        """vLLM's reset of the prefix cache with ``reset_connector``: nothing stored before
        is reused by this engine from now on (:meth:`.scheduler.SchedulerSide.reset`)."""
        assert self._scheduler is not None
        self._scheduler.reset()
        log.info("%s: cache reset; requests from now on reuse nothing stored before", CONNECTOR_NAME)
        return True

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request. Its blocks are freed at once, unless groups of it were handed
        to the workers to save: then they stay until the workers report the copies out of
        them done (``get_finished``), so no step has to wait for copies.

        The request's output carries ``kv_transfer_params["vua_s3"]``: ``hit_tokens``
        (prompt tokens loaded from the store) and ``stored_or_queued_tokens`` (leading
        prompt tokens stored, queued for upload, or held by the local prefix cache)."""
        assert self._scheduler is not None
        self._requests.pop(request.request_id, None)
        holds = self._scheduler.holds(request.request_id)
        return holds, self._scheduler.finished(request.request_id)

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Map each attention layer's paged cache to K/V views, in model layer order."""
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        config = self._vllm_config
        tp_rank, pp_rank = get_tensor_model_parallel_rank(), get_pp_group().rank_in_group
        stage = derive_identity(config, self._settings, pp_rank)
        tp_size, kv_heads = config.parallel_config.tensor_parallel_size, config.model_config.get_total_num_kv_heads()
        heads, writes = rank_heads(tp_size, tp_rank, kv_heads), rank_writes(tp_size, tp_rank, kv_heads)
        head_size = config.model_config.get_head_size()
        forward_context = config.compilation_config.static_forward_context
        layers = []
        for name in sorted(kv_caches, key=extract_layer_index):
            module = forward_context.get(name)
            backend = module.get_attn_backend().get_name() if module is not None else "unknown"
            isa = getattr(module, "isa", None)
            layers.append(PagedLayer(name, kv_caches[name], backend, head_size, isa, _cpu_writer(backend)))
        first = layers[0]
        ratio = kv_caches[first.name].size(0) // self._kv_cache_config.num_blocks
        vua = self._open(stage, self._settings.load_timeout_s)
        # Called on the compute thread, after vLLM pinned it: the loop (and the client
        # threads it starts from now on) and the copier move to the cores it left free.
        spare = spare_cpus()
        self._loop.submit(_run_on(spare))
        self._loop.submit(_warm_up(vua))
        self._worker = WorkerSide(
            vua, pp_rank, heads, writes, layers, ratio, self._block_size, self._loop,
            self._stats, self._problems, max_pending_save_bytes=self._settings.max_pending_save_bytes,
            flush_timeout_s=self._settings.flush_timeout_s, where=self._where, cpus=spare,
            counts=tp_rank == 0 and pp_rank == 0,
        )  # fmt: skip
        log.info(
            "%s: worker on %s, namespace %s, %d layers of %s %s KV (heads %d-%d of %d, writes %s, x %d), "
            "%d kernel blocks per block; its threads on CPUs %s",
            CONNECTOR_NAME, self._where, stage.namespace, len(layers), first.device, first.dtype,
            heads.start, heads.stop - 1, kv_heads, "none" if writes is None else "them", first.head_size, ratio,
            sorted(spare) or "unchanged",
        )  # fmt: skip

    def _plan(self) -> Plan:
        meta = self._connector_metadata
        return meta if isinstance(meta, VUAConnectorMetadata) else Plan()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before the step may reuse preempted requests' blocks: their copies end first.
        Nothing else waits (running requests' blocks stay, finished ones' are held), so a
        vLLM that calls this only when it preempts is served as well."""
        if self._worker is not None and isinstance(kv_connector_metadata, VUAConnectorMetadata):
            self._worker.flush(kv_connector_metadata.preempted)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Start this step's loads; they complete in the background (see get_finished)."""
        if self._worker is not None:
            self._worker.start_loads(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing: a request's KV is complete before vLLM schedules it (asynchronous loads)."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Nothing: finished groups are copied out after the forward pass (wait_for_save)."""

    def wait_for_save(self) -> None:
        """Copy this step's finished groups out in the background and queue their upload."""
        if self._worker is not None:
            self._worker.start_saves(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """``(sending, recving)``: finished requests whose copies are done (vLLM frees their
        blocks), and requests whose load ended (filled, failed, or cancelled because the
        request finished or was aborted: reported once it stopped writing)."""
        if self._worker is None:
            return None, None
        sending, recving = self._worker.finished(finished_req_ids)
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks of the loads reported by get_finished in this pass that stayed unfilled."""
        return self._worker.load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self._worker is None:
            return None
        failures, settled = self._worker.take_store_failures(), self._worker.take_settled()
        return VUAWorkerMetadata(store_failures=failures, settled=settled) if failures or settled else None

    # ------------------------------------------------------------------ metrics

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._scheduler is not None:
            self._stats.level("breaker_open", float(not self._breaker.allows()))
            probed = sum(probe.probe_requests for probe in self._probes)
            if probed > self._probed:
                self._stats.add("lookup_heads", probed - self._probed)
                self._probed = probed
        values = self._stats.take()
        return VUAS3Stats(data=values) if values else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return VUAS3Stats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return VUAS3PromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Let queued uploads finish (up to ``flush_timeout_s``), then release the store."""
        if self._worker is not None:
            self._worker.shutdown()
        try:
            self._loop.run(self._store.close())
        except Exception as exc:
            log.debug("%s: closing the store failed: %s", CONNECTOR_NAME, exc)
        self._loop.stop()


async def _run_on(cpus: frozenset[int]) -> None:
    run_here_on(cpus)


async def _warm_up(vua: AsyncVUA) -> None:
    with contextlib.suppress(Exception):  # a failing store shows in the first lookup
        await vua.stored_sizes(torch.zeros(vua.config().split_factor, dtype=torch.int64))


async def _write_manifests(store: Store, stages: list[Manifest]) -> None:
    """What each namespace's identity covers, for people listing the store (``vua-s3 ls``)."""
    for stage in stages:
        try:
            await write_manifest(store, stage)
        except Exception as exc:  # the listing is the only thing it costs
            log.debug("%s: writing the identity manifest of %s failed: %s", CONNECTOR_NAME, stage.namespace, exc)


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
