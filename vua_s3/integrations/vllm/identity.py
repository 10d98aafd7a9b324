"""What the connector's objects are valid for: the namespace and identity of a pipeline stage's
fragments, what besides the tokens keys a request, and the setups it refuses because it could
not store them correctly. Pure: no vLLM import (vLLM's objects are read by attribute).

Every input that changes the K/V bytes vLLM computes for the same token ids goes into one
digest (the list, and why the tensor-parallel size, block size and attention backend are not
in it: docs/vllm.md, Namespace). The full digest is the objects' ``identity`` (checked on
read); a readable prefix and a short digest make the namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import TYPE_CHECKING, Any

from ...keys import namespace_part
from ...manifest import Manifest
from ..digest import canonical, config_dict
from ..weights import weights_of
from .settings import CONNECTOR_NAME, ConnectorSettings

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

#: Version of how vLLM's paged KV maps to fragments. 2: one object per (group, KV head),
#: shared by every tensor-parallel size.
LAYOUT_TAG = "vllm-kv2"
#: Weight loaders that read from somewhere the connector cannot see (object storage, a tensorizer URI).
_REMOTE_LOADERS = frozenset({"runai_streamer", "runai_streamer_sharded", "tensorizer"})
#: The only paged cache the connector maps: one full-attention K/V cache per layer.
_SUPPORTED_SPEC = "FullAttentionSpec"
#: Salt of requests whose LoRA adapter cannot be read here: their KV is never shared with another engine.
_UNSHARED = uuid.uuid4().hex


def derive_identity(vllm_config: VllmConfig, settings: ConnectorSettings, pp_rank: int) -> Manifest:
    """Pipeline stage ``pp_rank``'s namespace, the identity written into and checked on each of
    its objects, and the readable inputs (its manifest, which ``vua-s3 ls`` shows)."""
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    pp_size = parallel.pipeline_parallel_size
    dtype = _dtype(model_config.dtype)
    kv_dtype = dtype if cache_config.cache_dtype == "auto" else str(cache_config.cache_dtype)
    weights, weights_readable = _weights(model_config, vllm_config.load_config.load_format, settings)
    inputs = {
        "layout": LAYOUT_TAG,
        "model": _model_inputs(model_config),
        "weights": weights,
        "model_id": settings.model_id,
        "kv_dtype": kv_dtype,
        "kv_dtype_skip_layers": sorted(cache_config.kv_cache_dtype_skip_layers),
        "sliding_window": cache_config.sliding_window,
        "kv_sharing_fast_prefill": cache_config.kv_sharing_fast_prefill,
        "layers": model_config.get_total_num_hidden_layers(),
        "kv_heads": model_config.get_total_num_kv_heads(),
        "head_size": model_config.get_head_size(),
        # Each stage stores its own layers: which ones is the partition's business.
        "pp": [pp_size, pp_rank, os.environ.get("VLLM_PP_LAYER_PARTITION") if pp_size > 1 else None],
        "draft": _draft_inputs(vllm_config, settings),
        "additional_config": vllm_config.additional_config or None,
    }
    digest = hashlib.sha256(canonical(inputs)).hexdigest()
    model = settings.model_id or model_config.model
    base = settings.namespace or namespace_part(model.rstrip("/").rsplit("/", 1)[-1]).strip("-.")
    tag = kv_dtype + (f".pp{pp_size}r{pp_rank}" if pp_size > 1 else "")
    namespace = f"{(base or 'model')[:64]}.{tag}.{digest[:12]}"
    readable = {
        "integration": "vllm",
        "layout": LAYOUT_TAG,
        "model": model,
        "weights": weights_readable,
        "dtype": dtype,
        "kv_dtype": kv_dtype,
        "quantization": model_config.quantization,
        "layers": inputs["layers"],
        "kv_heads": inputs["kv_heads"],
        "head_size": inputs["head_size"],
        "max_model_len": model_config.max_model_len,
        "pp": f"{pp_rank}/{pp_size}",
        "hf_overrides": _overrides(model_config.hf_overrides),
        "draft": (inputs["draft"] or {}).get("method"),
        "config_sha256": hashlib.sha256(canonical(inputs["model"]["config"])).hexdigest()[:16],
    }
    return Manifest(namespace, f"{LAYOUT_TAG}:sha256:{digest}", {k: v for k, v in readable.items() if v is not None})


def request_salt(settings: ConnectorSettings, request: Request) -> str | None:
    """What besides the token ids decides the KV: the operator's salt, vLLM's per-request
    ``cache_salt``, the LoRA adapter (by its files, checked for every request: vLLM may load an
    adapter again from disk; not by its name, which another adapter may take), and the
    content hash and place of every multimodal input (placeholder ids say nothing of content)."""
    lora = getattr(request, "lora_request", None)
    parts: list[Any] = [settings.salt, getattr(request, "cache_salt", None), _adapter(lora) if lora else None]
    media = [[f.identifier, f.mm_position.offset, f.mm_position.length] for f in request.mm_features or ()]
    if media:
        parts.append(media)
    if not any(parts):
        return None
    return json.dumps(parts)


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> None:
    """Refuse, at start-up and naming the setting, what the connector cannot store correctly."""
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    problems = []
    for name, flag in (("decode_context_parallel_size", "--decode-context-parallel-size"),
                       ("prefill_context_parallel_size", "--prefill-context-parallel-size")):  # fmt: skip
        size = getattr(parallel, name)
        if size > 1:
            problems.append(f"{name}={size} ({flag}): context parallelism spreads a request's tokens over ranks")
    if model_config.use_mla:
        problems.append("MLA attention (a latent KV cache, e.g. DeepSeek V2/V3): not supported")
    if model_config.is_hybrid or model_config.is_attention_free:
        problems.append(f"{model_config.architecture} keeps recurrent (Mamba, linear attention) state, not only K/V")
    if model_config.is_encoder_decoder:
        problems.append(f"{model_config.architecture} is an encoder-decoder: cross-attention KV is not the prompt's")
    if not getattr(model_config.hf_text_config, "is_causal", True) or vllm_config.attention_config.use_non_causal:
        problems.append("non-causal attention: a token's K/V depends on the tokens after it")
    if vllm_config.load_config.load_format == "dummy":
        problems.append("load_format=dummy: random weights, different on every tensor-parallel layout")
    for group in kv_cache_config.kv_cache_groups if kv_cache_config is not None else ():
        spec = type(group.kv_cache_spec).__name__
        if spec != _SUPPORTED_SPEC:
            problems.append(f"a {spec} KV cache (layers {', '.join(group.layer_names[:3])}...): only full attention")
    if problems:
        raise ValueError(f"{CONNECTOR_NAME} cannot store this engine's KV correctly: " + "; ".join(problems))


def _model_inputs(model_config: ModelConfig) -> dict[str, Any]:
    """The model as vLLM resolved it: its whole HF config (overrides applied) and the settings
    that change what it computes."""
    text = model_config.hf_text_config
    config = config_dict(model_config.hf_config)
    return {
        "config": config,
        "text_config": None if text is model_config.hf_config else config_dict(text),
        "hf_overrides": _overrides(model_config.hf_overrides),
        "dtype": _dtype(model_config.dtype),
        "quantization": model_config.quantization,
        "quantization_config": model_config.quantization_config,
        # vLLM's model code reads it (Phi-3 LongRoPE picks its factors, Llama 4 its attention temperature).
        "max_model_len": model_config.max_model_len,
        "disable_sliding_window": model_config.disable_sliding_window,
        "model_class_overrides": model_config.model_class_overrides or None,
    }


def _draft_inputs(vllm_config: VllmConfig, settings: ConnectorSettings) -> dict[str, Any] | None:
    """A speculative decoder whose layers write the same paged cache (EAGLE, MTP, draft models):
    its layers are stored with the model's, so its model and weights count too."""
    spec = vllm_config.speculative_config
    if spec is None or not spec.uses_draft_kv_cache():
        return None
    draft = spec.draft_model_config
    return {
        "method": spec.method,
        "model": _model_inputs(draft),
        "weights": _weights(draft, (spec.draft_load_config or vllm_config.load_config).load_format, settings)[0],
        "layers": draft.get_total_num_hidden_layers(),
        "kv_dtype": spec.kv_cache_dtype,
    }


def _weights(model_config: ModelConfig, load_format: str, settings: ConnectorSettings) -> tuple[str, Any]:
    """The weights' digest and readable form; a clear error if they cannot be read here and
    ``model_id`` does not name them."""
    found = None
    if not model_config.model_weights and load_format not in _REMOTE_LOADERS:
        found = weights_of(model_config.model, model_config.revision)
    if found is not None:
        return found.digest, found.readable
    if settings.model_id:
        return f"model_id:{settings.model_id}", {"model_id": settings.model_id}
    raise ValueError(
        f"{CONNECTOR_NAME} cannot tell which weights {model_config.model_weights or model_config.model!r} are "
        f"(load_format={load_format}; not a local path, and no commit of it in the local Hugging Face cache): "
        "pass --revision <commit>, or set kv_connector_extra_config model_id to a name that changes "
        "whenever the weights do"
    )


def _adapter(lora: Any) -> list[Any]:
    path = str(lora.lora_path)
    found = weights_of(path, None)
    return [path, found.digest if found is not None else _UNSHARED]


def _overrides(overrides: Any) -> Any:
    """Dict overrides as given; a callable's effect is already in the resolved config, its name is kept."""
    if callable(overrides):
        return getattr(overrides, "__qualname__", repr(overrides))
    return overrides or None


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
