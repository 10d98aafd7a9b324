"""HuggingFace transformers: load a stored prompt prefix instead of recomputing it.

``cached_prefill(model, input_ids, vua)`` loads the longest stored prefix of the prompt
into a ``DynamicCache``, runs the model on the remaining tokens only, stores the
prompt's new full groups and returns the output with the cache, ready for generation.
``vua_for_model`` opens a cache whose namespace and identity are derived from the model
(:func:`model_identity`), so models sharing a bucket never read each other's KV.

Works with decoder-only models whose cache is one full-attention ``DynamicLayer`` per
layer (Llama, Qwen2, Mistral without sliding window, ...), on transformers 4.57 to 5.x.
The stored layout is the model's own cache layout: per layer ``[1, kv_heads, n, head_dim]``,
K after RoPE and before the KV heads are repeated for grouped-query attention.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from ..config import DEFAULT_SPLIT_FACTOR, VUAConfig
from ..fragment import KVCache
from ..keys import namespace_part
from ..loop import BackgroundLoop
from ..manifest import Manifest, write_manifest
from ..storage import Location, Store, open_store
from ..sync import VUA
from .digest import canonical, config_dict
from .weights import weights_of

log = logging.getLogger(__name__)
#: Version of how a DynamicCache maps to fragments: per layer [1, kv_heads, n, head_dim] (format 2).
_LAYOUT_TAG = "hf-dynamic1"

#: Leading elements of each parameter hashed into the namespace: enough to tell fine-tunes apart, cheap to read.
_FINGERPRINT_ELEMENTS = 64


def kv_layout(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of the KV cache a model with this config keeps."""
    text = _text_config(config)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return int(text.num_hidden_layers), int(heads), int(head_dim)


def model_identity(model: PreTrainedModel) -> Manifest:
    """The namespace, identity and readable inputs of this model's KV, derived as the vLLM
    connector derives its own: everything that changes the K/V bytes for the same token ids.

    Covered: the whole config (``to_dict()``, less where it was read from and the attention
    implementation), the dtype, the weights' identity when the model came from a path (its
    files: names, sizes, times, sampled content) or the hub (the commit), and a fingerprint of
    the loaded values (the leading elements of every parameter), so weights changed in memory,
    or a model built from a config, count too. A readable prefix names the architecture and
    KV shape; the full digest is the objects' identity (checked on read).
    """
    layers, heads, head_dim = kv_layout(model.config)
    dtype = str(model.dtype).removeprefix("torch.")
    source = str(getattr(model.config, "_name_or_path", "") or "")
    commit = getattr(model.config, "_commit_hash", None)
    weights = None
    if source:
        found = weights_of(source, commit)
        weights = (found.digest, found.readable) if found is not None else None
    inputs = {"layout": _LAYOUT_TAG, "config": config_dict(model.config), "dtype": dtype, "weights": weights}
    digest = hashlib.sha256(canonical(inputs))
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            continue
        head = param.detach().reshape(-1)[:_FINGERPRINT_ELEMENTS].to("cpu").contiguous()
        digest.update(name.encode() + b"\0" + str(head.dtype).encode() + b"\0")
        digest.update(head.view(torch.uint8).numpy().tobytes())
    hexdigest = digest.hexdigest()
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    arch = namespace_part(str(architectures[0]), "_")[:48]
    namespace = f"{arch}-L{layers}-kv{heads}-d{head_dim}-{dtype}-{hexdigest[:16]}"
    readable = {"integration": "transformers", "layout": _LAYOUT_TAG, "model": source or arch,
                "weights": weights[1] if weights else "in memory only", "dtype": dtype, "layers": layers,
                "kv_heads": heads, "head_size": head_dim,
                "config_sha256": hashlib.sha256(canonical(inputs["config"])).hexdigest()[:16]}  # fmt: skip
    return Manifest(namespace, f"{_LAYOUT_TAG}:sha256:{hexdigest}", readable)


def model_namespace(model: PreTrainedModel) -> str:
    """The namespace of :func:`model_identity`."""
    return model_identity(model).namespace


def vua_for_model(
    model: PreTrainedModel,
    location: Location,
    *,
    split_factor: int = DEFAULT_SPLIT_FACTOR,
    namespace: str | None = None,
    **options: Any,
) -> VUA:
    """A :class:`VUA` for ``model``'s KV at ``location``, the default way to open one: the
    namespace (unless given) and the identity checked on every read are :func:`model_identity`'s,
    so another model never reads this one's KV, even under the same hand-typed ``namespace``.
    At a path or URL, the namespace's identity manifest is written too (``vua-s3 ls`` shows it)."""
    derived = model_identity(model)
    manifest = Manifest(namespace or derived.namespace, derived.identity, derived.inputs)
    vua = VUA(VUAConfig(split_factor=split_factor, namespace=manifest.namespace, identity=manifest.identity), location,
              **options)  # fmt: skip
    if not isinstance(location, Store):  # a Store belongs to the VUA's loop from now on
        _write_manifest(location, manifest)
    return vua


def _write_manifest(location: str | os.PathLike[str], manifest: Manifest) -> None:
    async def write() -> None:
        store = open_store(location)
        try:
            await write_manifest(store, manifest)
        finally:
            await store.close()

    loop = BackgroundLoop(name="vua-s3-manifest")
    try:
        loop.run(write())
    except Exception as exc:  # the listing is all it costs
        log.debug("writing the identity manifest of %s failed: %s", manifest.namespace, exc)
    finally:
        loop.stop()


def kv_from_cache(cache: DynamicCache, length: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(K, V)`` views of the first ``length`` tokens of ``cache`` (all if ``None``)."""
    kv = []
    for layer in _full_attention_layers(cache):
        if layer.keys is None or layer.values is None:
            raise ValueError("the cache holds no KV yet")
        kv.append((layer.keys[:, :, :length], layer.values[:, :, :length]))
    return kv


def cache_from_kv(kv: KVCache, config: Any = None) -> DynamicCache:
    """A ``DynamicCache`` holding ``kv`` (as :meth:`VUA.get_closest` returns it).

    With ``config`` the cache is laid out for that model, and a model whose layers are
    not all full attention (sliding window, linear attention) is refused.
    """
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    if config is not None:
        _full_attention_layers(cache)
    for index, (keys, values) in enumerate(kv):
        cache.update(keys, values, index)
    return cache


@dataclass
class CachedPrefill:
    """What :func:`cached_prefill` did.

    ``output`` is the model's output for the tokens it ran (the prompt from
    ``cached_tokens`` on; ``output.logits[:, -1]`` gives the first new token);
    ``cache`` holds the whole prompt's KV. ``timings`` are seconds for ``load``
    (probe, fetch, cache build), ``forward`` and ``store``.
    """

    output: Any
    cache: DynamicCache
    cached_tokens: int
    stored_groups: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def logits(self) -> torch.Tensor:
        return self.output.logits  # type: ignore[no-any-return]


def cached_prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    vua: VUA,
    *,
    salt: str | None = None,
    store: bool = True,
    **forward_kwargs: Any,
) -> CachedPrefill:
    """Prefill ``input_ids`` (one sequence, ``[n]`` or ``[1, n]``) reusing and extending ``vua``.

    Loads the longest stored prefix, runs ``model`` on the rest (at least the last
    token, whose logits start generation), then stores the prompt's full groups that
    were not stored yet. ``forward_kwargs`` go to the model (e.g. ``logits_to_keep=1``).
    """
    ids = _one_sequence(input_ids, model)
    start = time.perf_counter()
    cache, stored_len, prefix = _load_prefix(model, ids, vua, salt)
    loaded = time.perf_counter()
    with torch.no_grad():
        output = model(input_ids=ids[:, prefix:], use_cache=True, **{_cache_argument(model): cache}, **forward_kwargs)
    ran = time.perf_counter()
    written = _store_prompt(vua, ids, cache, stored_len, salt) if store else 0
    timings = {"load": loaded - start, "forward": ran - loaded, "store": time.perf_counter() - ran}
    return CachedPrefill(output=output, cache=cache, cached_tokens=prefix, stored_groups=written, timings=timings)


def cached_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    vua: VUA,
    *,
    salt: str | None = None,
    store: bool = True,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate`` on one prompt, starting from its longest stored prefix.

    ``generate`` prefills only the uncached rest; the prompt's new full groups are then
    stored. Returns what ``generate`` returns.
    """
    ids = _one_sequence(input_ids, model)
    cache, stored_len, _ = _load_prefix(model, ids, vua, salt)
    output = cast(Any, model).generate(ids, **{_cache_argument(model): cache}, **generate_kwargs)
    if store:
        _store_prompt(vua, ids, cache, stored_len, salt)
    return output


def _load_prefix(
    model: PreTrainedModel, ids: torch.Tensor, vua: VUA, salt: str | None
) -> tuple[DynamicCache, int, int]:
    """A cache holding the stored prefix, the stored length, and how much of it is used.

    At most ``n - 1`` tokens are used, so the model always runs the last prompt token.
    """
    found = vua.get_closest(ids[0], device=model.device, salt=salt)
    if found is None:
        return cache_from_kv([], model.config), 0, 0
    _check_fits(model, found.data, vua)
    stored_len = len(found.tokens)
    prefix = min(stored_len, ids.size(1) - 1)
    kv = [(keys[:, :, :prefix], values[:, :, :prefix]) for keys, values in found.data]
    return cache_from_kv(kv if prefix else [], model.config), stored_len, prefix


def _store_prompt(vua: VUA, ids: torch.Tensor, cache: DynamicCache, stored_len: int, salt: str | None) -> int:
    """Store the prompt's full groups if it has any beyond the ``stored_len`` tokens already stored."""
    full = ids.size(1) - ids.size(1) % vua.config().split_factor
    if full <= stored_len:
        return 0
    return vua.put(ids[0, :full], kv_from_cache(cache, full), salt=salt)


def _one_sequence(input_ids: torch.Tensor, model: PreTrainedModel) -> torch.Tensor:
    """``input_ids`` as ``[1, n]`` on the model's device; batches are not supported."""
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.size(0) != 1 or ids.size(1) == 0:
        raise ValueError(f"expected one non-empty sequence of shape [n] or [1, n], got {list(input_ids.shape)}")
    return ids.to(model.device)


def _check_fits(model: PreTrainedModel, kv: KVCache, vua: VUA) -> None:
    """Refuse stored KV whose shape or dtype is not this model's (a namespace shared by two models)."""
    layers, heads, head_dim = kv_layout(model.config)
    keys = kv[0][0]
    if len(kv) != layers or keys.size(1) != heads or keys.size(3) != head_dim or keys.dtype != model.dtype:
        raise ValueError(
            f"namespace {vua.config().namespace!r} holds KV of {len(kv)} layers x {list(keys.shape)} {keys.dtype}, "
            f"but this model keeps {layers} layers x [1, {heads}, n, {head_dim}] {model.dtype}: "
            "give each model its own namespace (vua_for_model does)"
        )


def _full_attention_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, if each is a plain full-attention layer (not sliding, linear or quantized)."""
    layers = []
    for index, layer in enumerate(cache.layers):
        if not isinstance(layer, DynamicLayer) or type(layer) is not DynamicLayer:
            raise TypeError(
                f"cache layer {index} is a {type(layer).__name__}; vua_s3 stores full-attention DynamicLayer KV only"
            )
        layers.append(layer)
    return layers


def _text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs nest it; plain ones are their own)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _cache_argument(model: PreTrainedModel) -> str:
    """The name ``forward`` takes the cache under: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
