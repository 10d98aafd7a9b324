"""The connector's settings and identity: ``kv_connector_extra_config``, the namespace of a
worker's fragments and what besides the tokens keys a request. Pure: no vLLM import."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...checks import optional_seconds, positive_int, positive_seconds
from ...config import DEFAULT_SPLIT_FACTOR
from ...keys import namespace_part

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

CONNECTOR_NAME = "VUAS3Connector"
#: Version of how vLLM's paged KV maps to fragments; part of every namespace. 2: one
#: object per (group, KV head), shared by every tensor-parallel size.
_LAYOUT_TAG = "vllm-kv2"


@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config``, checked once at start-up."""

    url: str
    split_factor: int = DEFAULT_SPLIT_FACTOR
    namespace: str | None = None
    model_id: str | None = None
    salt: str | None = None
    max_inflight: int = 8
    max_pending_save_bytes: int = 1 << 30
    flush_timeout_s: float = 60.0
    lookup_timeout_s: float = 5.0
    load_timeout_s: float = 30.0
    breaker_backoff_s: float = 10.0
    breaker_max_backoff_s: float = 300.0
    load_failure_policy: str = "recompute"
    refresh_after: float | None = None
    """Seconds: loads re-stamp what they read once older (``AsyncVUA(refresh_after=)``); off by default."""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> ConnectorSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"{CONNECTOR_NAME}: unknown kv_connector_extra_config keys {unknown}; known: {sorted(known)}"
            )
        if not extra.get("url"):
            raise ValueError(
                f'{CONNECTOR_NAME} needs kv_connector_extra_config {{"url": "s3://bucket/prefix"}} (or a path)'
            )
        settings = cls(**extra)
        for name in ("split_factor", "max_inflight", "max_pending_save_bytes"):
            positive_int(f"{CONNECTOR_NAME}: {name}", getattr(settings, name))
        for name in ("flush_timeout_s", "lookup_timeout_s", "load_timeout_s", "breaker_backoff_s",
                     "breaker_max_backoff_s"):  # fmt: skip
            positive_seconds(f"{CONNECTOR_NAME}: {name}", getattr(settings, name))
        optional_seconds(f"{CONNECTOR_NAME}: refresh_after", settings.refresh_after)
        if settings.load_failure_policy not in ("recompute", "fail"):
            raise ValueError(f"{CONNECTOR_NAME}: load_failure_policy must be 'recompute' or 'fail'")
        return settings


def derive_namespace(vllm_config: VllmConfig, settings: ConnectorSettings, pp_rank: int) -> str:
    """The namespace of one pipeline stage's fragments: everything that changes their bytes.

    Model (or ``model_id``), revision, quantization, KV dtype, layer and head counts,
    head size, and the pipeline-parallel size and rank (each stage stores its own
    layers). The tensor-parallel size and rank are left out: a group is one object per
    KV head (:mod:`vua_s3.shards`), so engines of every TP size and the VUA API share
    the objects. vLLM's block size and paged layout are left out on purpose too:
    fragments hold plain ``[layers, 2, heads, tokens, head_dim]`` K/V, so engines with
    different block sizes or attention backends share them. A readable prefix is kept
    for people listing the bucket; a digest of the full identity makes it unique.
    """
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    kv_dtype = str(model_config.dtype).removeprefix("torch.") if cache_dtype == "auto" else str(cache_dtype)
    model = settings.model_id or model_config.model
    identity = {
        "layout": _LAYOUT_TAG,
        "model": model,
        "revision": model_config.revision,
        "quantization": model_config.quantization,
        "kv_dtype": kv_dtype,
        "layers": model_config.get_total_num_hidden_layers(),
        "kv_heads": model_config.get_total_num_kv_heads(),
        "head_size": model_config.get_head_size(),
        "pp": [parallel.pipeline_parallel_size, pp_rank],
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    base = settings.namespace or namespace_part(model.rstrip("/").rsplit("/", 1)[-1]).strip("-.")
    tag = kv_dtype
    if parallel.pipeline_parallel_size > 1:
        tag += f".pp{parallel.pipeline_parallel_size}r{pp_rank}"
    return f"{(base or 'model')[:64]}.{tag}.{digest}"


def request_salt(settings: ConnectorSettings, request: Request) -> str | None:
    """What besides the token ids decides the KV: the operator's salt, vLLM's per-request
    ``cache_salt``, the LoRA adapter, and the content hash and place of every multimodal
    input (its placeholder token ids say nothing about the content)."""
    lora = getattr(request, "lora_request", None)
    parts: list[Any] = [settings.salt, getattr(request, "cache_salt", None), lora.lora_name if lora else None]
    media = [[f.identifier, f.mm_position.offset, f.mm_position.length] for f in request.mm_features or ()]
    if media:
        parts.append(media)
    if not any(parts):
        return None
    return json.dumps(parts)


def cacheable(request: Request) -> bool:
    """Whether token ids (and :func:`request_salt`) name the request's KV: not for
    ``prompt_embeds``, where placeholder ids stand in for embeddings."""
    return request.prompt_token_ids is not None and getattr(request, "prompt_embeds", None) is None
