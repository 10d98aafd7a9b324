"""The connector's metrics in vLLM's terms: a ``KVConnectorStats`` and Prometheus metrics.

vLLM gathers each step's stats from the scheduler and every worker, folds them with
:meth:`VUAS3Stats.aggregate`, logs :meth:`VUAS3Stats.reduce` and hands the data to
:class:`VUAS3PromMetrics`, which shows them in ``/metrics`` and ``LLM.get_metrics()``
as ``vllm:vua_s3_*`` (the ``vllm:`` prefix is what both of those export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from .stats import METRICS, merge

if TYPE_CHECKING:
    from vllm.config import VllmConfig

PREFIX = "vllm:vua_s3_"


@dataclass
class VUAS3Stats(KVConnectorStats):  # type: ignore[misc]
    """``data`` maps names of :data:`~.stats.METRICS` to values."""

    def reset(self) -> None:
        self.data.clear()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merge(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: round(value, 6) for name, value in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not self.data


class VUAS3PromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """One Prometheus counter or gauge per metric, per engine."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[tuple[int, str], Any] = {}
        for name, (kind, documentation) in METRICS.items():
            if kind == "gauge":
                metric = self._gauge_cls(
                    name=PREFIX + name,
                    documentation=documentation,
                    labelnames=labelnames,
                    multiprocess_mode="mostrecent",
                )
            else:
                metric = self._counter_cls(name=PREFIX + name, documentation=documentation, labelnames=labelnames)
            for engine, values in per_engine_labelvalues.items():
                self._metrics[engine, name] = metric.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            metric = self._metrics.get((engine_idx, name))
            if metric is None:
                continue
            if METRICS[name][0] == "gauge":
                metric.set(value)
            elif value > 0:
                metric.inc(value)
