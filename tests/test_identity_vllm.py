"""The vLLM connector's identity, without vLLM: every input that changes the K/V bytes changes the
digest (and so the namespace and the objects' identity), the tensor-parallel size, block size and
attention backend do not; LoRA adapters count by their files, not their names; what cannot be
stored correctly is refused at start-up, naming the setting. Configurations are stand-ins with
the attributes the connector reads; tests/vllm/test_vllm_identity.py does the same on vLLM's own."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vua_s3.integrations.vllm.identity import check_supported, derive_identity, request_salt
from vua_s3.integrations.vllm.settings import ConnectorSettings
from vua_s3.manifest import Manifest

SETTINGS = ConnectorSettings(url="/unused")
HF = {"model_type": "llama", "num_hidden_layers": 2, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
      "_name_or_path": "/somewhere", "transformers_version": "5.0"}  # fmt: skip


class HFConfig:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.is_causal = True

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.values)


def model_config(path: Path, **changes: Any) -> Any:
    hf = HFConfig(copy.deepcopy(HF))
    fields: dict[str, Any] = dict(
        model=str(path), model_weights="", revision=None, hf_config=hf, hf_text_config=hf, hf_overrides={},
        dtype="torch.float32", quantization=None, quantization_config=None, max_model_len=1024,
        disable_sliding_window=False, model_class_overrides={}, use_mla=False, is_hybrid=False,
        is_attention_free=False, is_encoder_decoder=False, architecture="LlamaForCausalLM",
    )  # fmt: skip
    fields.update(changes)
    counts = {"layers": 2, "kv_heads": 2, "head_size": 64}
    config = SimpleNamespace(**fields, counts=counts)
    config.get_total_num_hidden_layers = lambda: config.counts["layers"]
    config.get_total_num_kv_heads = lambda: config.counts["kv_heads"]
    config.get_head_size = lambda: config.counts["head_size"]
    return config


def vllm_config(path: Path) -> Any:
    return SimpleNamespace(
        model_config=model_config(path),
        cache_config=SimpleNamespace(cache_dtype="auto", kv_cache_dtype_skip_layers=[], sliding_window=None,
                                     kv_sharing_fast_prefill=False, block_size=32),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1,
                                        decode_context_parallel_size=1, prefill_context_parallel_size=1),
        load_config=SimpleNamespace(load_format="auto"),
        attention_config=SimpleNamespace(backend=None, use_non_causal=False),
        speculative_config=None,
        additional_config={},
    )  # fmt: skip


def checkpoint(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(bytes([seed]) * 4096)
    (directory / "config.json").write_text("{}")
    for name in ("model.safetensors", "config.json"):
        os.utime(directory / name, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    return directory


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return checkpoint(tmp_path / "tiny-llama")


def identity(config: Any, pp_rank: int = 0, settings: ConnectorSettings = SETTINGS) -> Manifest:
    return derive_identity(config, settings, pp_rank)


def draft(config: Any, path: Path) -> None:
    """EAGLE: one draft layer writing the same paged cache."""
    config.speculative_config = SimpleNamespace(
        method="eagle", uses_draft_kv_cache=lambda: True, draft_model_config=model_config(path),
        draft_load_config=None, kv_cache_dtype=None,
    )  # fmt: skip


CHANGES: dict[str, Callable[[Any, Path], object]] = {
    "rope_theta": lambda c, p: c.model_config.hf_config.values["rope_parameters"].update(rope_theta=500000.0),
    "rope_scaling": lambda c, p: c.model_config.hf_config.values.update(rope_scaling={"type": "yarn", "factor": 4.0}),
    "sliding_window": lambda c, p: c.model_config.hf_config.values.update(sliding_window=4096),
    "logit_softcapping": lambda c, p: c.model_config.hf_config.values.update(attn_logit_softcapping=50.0),
    "hf_overrides": lambda c, p: setattr(c.model_config, "hf_overrides", {"rms_norm_eps": 1e-3}),
    "weights": lambda c, p: checkpoint(p, seed=1),  # same size, same times, other bytes
    "dtype": lambda c, p: setattr(c.model_config, "dtype", "torch.bfloat16"),
    "kv_dtype": lambda c, p: setattr(c.cache_config, "cache_dtype", "fp8_e4m3"),
    "kv_dtype_skip_layers": lambda c, p: setattr(c.cache_config, "kv_cache_dtype_skip_layers", ["0"]),
    "quantization": lambda c, p: setattr(c.model_config, "quantization", "fp8"),
    "layers": lambda c, p: c.model_config.counts.update(layers=3),
    "kv_heads": lambda c, p: c.model_config.counts.update(kv_heads=4),
    "head_size": lambda c, p: c.model_config.counts.update(head_size=128),
    "max_model_len": lambda c, p: setattr(c.model_config, "max_model_len", 131072),
    "disable_sliding_window": lambda c, p: setattr(c.model_config, "disable_sliding_window", True),
    "pipeline_parallel_size": lambda c, p: setattr(c.parallel_config, "pipeline_parallel_size", 2),
    "draft_layers": lambda c, p: draft(c, p),
    "model_id": lambda c, p: None,  # handled below: a setting, not the config
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_every_input_changes_the_identity(model: Path, name: str) -> None:
    config = vllm_config(model)
    before = identity(config)
    settings = ConnectorSettings(url="/unused", model_id="llama-3-8b") if name == "model_id" else SETTINGS
    CHANGES[name](config, model)
    after = identity(config, settings=settings)
    assert after.identity != before.identity and after.namespace != before.namespace
    assert after.namespace.rsplit(".", 1)[-1] == after.identity.removeprefix("vllm-kv2:sha256:")[:12]


def test_the_draft_model_and_its_weights_count(model: Path, tmp_path: Path) -> None:
    config = vllm_config(model)
    draft(config, checkpoint(tmp_path / "eagle"))
    before = identity(config).identity
    checkpoint(tmp_path / "eagle", seed=2)
    assert identity(config).identity != before


def test_layouts_that_store_the_same_bytes_share(model: Path, tmp_path: Path) -> None:
    config = vllm_config(model)
    base = identity(config)
    assert base.namespace.startswith("tiny-llama.float32.") and base.identity.startswith("vllm-kv2:sha256:")
    config.parallel_config.tensor_parallel_size = 4
    config.cache_config.block_size = 16
    config.attention_config.backend = "FLEX_ATTENTION"
    config.model_config.hf_config.values.update(_name_or_path="/elsewhere", transformers_version="5.1")
    assert identity(config) == base
    # The same files (names, sizes, times, content) at another path: one checkpoint, one cache.
    copy_of = Path(shutil.copytree(model, tmp_path / "mnt" / "tiny-llama", copy_function=shutil.copy2))
    assert identity(vllm_config(copy_of)).identity == base.identity
    # ngram speculation keeps no draft layers in the paged cache.
    config.speculative_config = SimpleNamespace(method="ngram", uses_draft_kv_cache=lambda: False)
    assert identity(config) == base


def test_pipeline_stages_have_their_own_identity(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = vllm_config(model)
    config.parallel_config.pipeline_parallel_size = 2
    stages = [identity(config, rank) for rank in (0, 1)]
    assert stages[0].identity != stages[1].identity and ".pp2r1." in stages[1].namespace
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "1,1")
    assert identity(config, 0).identity != stages[0].identity  # another partition: other layers


def test_readable_parts_name_the_deployment(model: Path) -> None:
    readable = identity(vllm_config(model)).inputs
    assert readable["model"] == str(model) and readable["weights"]["files"] == 2
    assert {readable[k] for k in ("dtype", "kv_dtype")} == {"float32"} and readable["pp"] == "0/1"


def test_weights_that_cannot_be_read_need_model_id(model: Path) -> None:
    config = vllm_config(model)
    config.model_config.model = "org/not-in-any-cache"
    with pytest.raises(ValueError, match=r"cannot tell which weights 'org/not-in-any-cache'.*model_id"):
        identity(config)
    config.model_config.model, config.model_config.model_weights = str(model), "s3://bucket/llama"  # RunAI
    with pytest.raises(ValueError, match="s3://bucket/llama"):
        identity(config)
    named = identity(config, settings=ConnectorSettings(url="/unused", model_id="llama-3-8b-v2"))
    assert named.inputs["weights"] == {"model_id": "llama-3-8b-v2"}
    config.model_config.model_weights = ""
    config.model_config.revision = "a" * 40  # a pinned hub commit names its weights
    config.model_config.model = "org/not-in-any-cache"
    assert identity(config).inputs["weights"] == {"commit": "a" * 40}


def spec(name: str, layers: list[str]) -> Any:
    return SimpleNamespace(kv_cache_spec=type(name, (), {})(), layer_names=layers)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: setattr(c.parallel_config, "decode_context_parallel_size", 2), "decode_context_parallel_size=2"),
        (lambda c: setattr(c.parallel_config, "prefill_context_parallel_size", 2), "prefill_context_parallel_size=2"),
        (lambda c: setattr(c.model_config, "use_mla", True), "MLA"),
        (lambda c: setattr(c.model_config, "is_hybrid", True), "Mamba"),
        (lambda c: setattr(c.model_config, "is_attention_free", True), "Mamba"),
        (lambda c: setattr(c.model_config, "is_encoder_decoder", True), "encoder-decoder"),
        (lambda c: setattr(c.attention_config, "use_non_causal", True), "non-causal"),
        (lambda c: setattr(c.model_config.hf_text_config, "is_causal", False), "non-causal"),
        (lambda c: setattr(c.load_config, "load_format", "dummy"), "load_format=dummy"),
    ],
)
def test_unsupported_setups_are_refused(model: Path, change: Callable[[Any], object], message: str) -> None:
    config = vllm_config(model)
    check_supported(config, SimpleNamespace(kv_cache_groups=[spec("FullAttentionSpec", ["layers.0", "layers.1"])]))
    change(config)
    with pytest.raises(ValueError, match=f"VUAS3Connector cannot store this engine's KV correctly: .*{message}"):
        check_supported(config, None)


@pytest.mark.parametrize("kind", ["SlidingWindowSpec", "MambaSpec", "MLAAttentionSpec", "ChunkedLocalAttentionSpec"])
def test_paged_caches_other_than_full_attention_are_refused(model: Path, kind: str) -> None:
    groups = [spec("FullAttentionSpec", ["model.layers.0.self_attn.attn"]), spec(kind, ["model.layers.1.self_attn"])]
    with pytest.raises(ValueError, match=f"a {kind} KV cache .*model.layers.1.self_attn"):
        check_supported(vllm_config(model), SimpleNamespace(kv_cache_groups=groups))


def request(lora: Any = None, cache_salt: str | None = None) -> Any:
    return SimpleNamespace(lora_request=lora, cache_salt=cache_salt, mm_features=None)


def adapter(name: str, int_id: int, path: Path) -> Any:
    return SimpleNamespace(lora_name=name, lora_int_id=int_id, lora_path=str(path))


def test_lora_adapters_count_by_their_files_not_their_names(tmp_path: Path) -> None:
    path = checkpoint(tmp_path / "adapter", seed=3)
    first = request_salt(SETTINGS, request(adapter("sql", 1, path)))
    assert first is not None and first == request_salt(SETTINGS, request(adapter("sql", 7, path)))
    assert request_salt(SETTINGS, request(adapter("other-name", 2, path))) == first  # same adapter
    checkpoint(path, seed=4)  # another adapter under the same name, path, size and times
    swapped = request_salt(SETTINGS, request(adapter("sql", 1, path)))
    assert swapped not in (first, None)
    missing = request_salt(SETTINGS, request(adapter("sql", 1, tmp_path / "gone")))
    assert missing not in (first, swapped, None)  # unreadable here: never shared with another engine
    assert request_salt(SETTINGS, request()) is None
    assert request_salt(SETTINGS, request(cache_salt="tenant-a")) != request_salt(SETTINGS, request(cache_salt="b"))
