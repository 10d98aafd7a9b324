"""Identities: objects carry the writer's model identity and a reader with another one gets a
miss and a warning, even under the same hand-typed namespace; identity manifests name what an
identity covers, ``vua-s3 ls`` shows them and ``gc`` never deletes them; the weights' identity
of a local checkpoint follows its files' content, not only their sizes and times."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache

from vua_s3 import VUA, VUAConfig
from vua_s3.cli.main import main
from vua_s3.integrations.weights import SAMPLE_BYTES, hub_commit, local_weights, weights_of
from vua_s3.manifest import Manifest, is_manifest_key, list_manifests, manifest_key, write_manifest
from vua_s3.ops.gc import gc
from vua_s3.storage import open_store

SPLIT = 16
TOKENS = torch.arange(1000, 1064)
A = "vllm-kv2:sha256:" + "a" * 64
B = "vllm-kv2:sha256:" + "b" * 64


def test_another_identity_under_the_same_namespace_is_a_miss(
    posix_or_moto: str, caplog: pytest.LogCaptureFixture
) -> None:
    kv = random_kvcache(seq_len=64)
    with VUA(VUAConfig(split_factor=SPLIT, namespace="shared", identity=A), posix_or_moto) as writer:
        assert writer.put(TOKENS, kv) == 4
    for other in (B, ""):  # another model's deployment, or a reader that names none
        reader = VUA(VUAConfig(split_factor=SPLIT, namespace="shared", identity=other), posix_or_moto)
        with reader, caplog.at_level(logging.WARNING, logger="vua_s3"):
            assert reader.get_closest(TOKENS) is None
        assert "written by another model identity" in caplog.text
        caplog.clear()
    with VUA(VUAConfig(split_factor=SPLIT, namespace="shared", identity=A), posix_or_moto) as same:
        found = same.get_closest(TOKENS)  # the positive control: the writer's identity reads it all
    assert found is not None and found.tokens.tolist() == TOKENS.tolist()
    assert_kv_equal(found.data, [(k.contiguous(), v.contiguous()) for k, v in kv])


def test_objects_without_identity_are_refused_by_a_reader_with_one(posix_or_moto: str) -> None:
    """Objects from before identities (or from a VUA user naming none) never reach an integration."""
    with VUA(VUAConfig(split_factor=SPLIT, namespace="old"), posix_or_moto) as writer:
        writer.put(TOKENS, random_kvcache(seq_len=64))
    with VUA(VUAConfig(split_factor=SPLIT, namespace="old", identity=A), posix_or_moto) as reader:
        assert reader.get_closest(TOKENS) is None


def test_manifests_are_listed_and_survive_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path)
    inputs = {"integration": "vllm", "model": "/models/llama", "weights": {"files": 2, "bytes": 4096}}
    with VUA(VUAConfig(split_factor=SPLIT, namespace="shared", identity=A), root) as vua:
        vua.put(TOKENS, random_kvcache(seq_len=64))

    async def write() -> list[bool]:
        store = open_store(root)
        try:
            wrote = [await write_manifest(store, Manifest("shared", A, inputs))]
            wrote.append(await write_manifest(store, Manifest("shared", A, inputs)))  # there already
            wrote.append(await write_manifest(store, Manifest("shared", B, {"model": "other"})))
            return wrote
        finally:
            await store.close()

    assert asyncio.run(write()) == [True, False, True]
    key = manifest_key("shared", A)
    assert is_manifest_key(key) and not is_manifest_key("shared/ab/" + "ab" * 32 + ".h0.safetensors")
    assert json.loads((tmp_path / key).read_text())["inputs"] == inputs

    assert main(["ls", root]) == 0
    out = capsys.readouterr().out
    assert "shared/\t8 objects\t4 groups" in out  # manifests are not fragments
    assert f"identity {A}: integration=vllm model=/models/llama weights.files=2 weights.bytes=4096" in out
    assert f"identity {B}: model=other" in out
    assert main(["ls", root, "shared"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[-1] for line in lines if "  ident  " in line) == sorted(
        [manifest_key("shared", A), manifest_key("shared", B)]
    )
    assert sum(line.startswith("identity ") for line in lines) == 2

    report = asyncio.run(gc(root, older_than=0, now=time.time() + 3600))
    assert report.deleted == 8 and report.skipped_foreign == 2
    assert (tmp_path / key).exists()

    async def listed() -> set[str]:
        store = open_store(root)
        try:
            return {m.identity for m in await list_manifests(store, "shared")}
        finally:
            await store.close()

    assert asyncio.run(listed()) == {A, B}


def write_weights(directory: Path, seed: int) -> Path:
    directory.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    (directory / "model.safetensors").write_bytes(torch.randn(300_000, generator=gen).numpy().tobytes())
    (directory / "config.json").write_text('{"model_type": "llama"}')
    return directory


def test_local_weights_follow_content_size_time_and_names(tmp_path: Path) -> None:
    model = write_weights(tmp_path / "m", seed=0)
    weights = model / "model.safetensors"
    first = local_weights(model)
    assert first == local_weights(model)  # stable
    assert first.readable["files"] == 2 and first.readable["bytes"] == weights.stat().st_size + 23

    stamp = weights.stat()
    data = bytearray(weights.read_bytes())
    data[0] ^= 1  # the first sample: one bit, same size, time set back
    weights.write_bytes(data)
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert local_weights(model).digest != first.digest
    data[0] ^= 1
    weights.write_bytes(data)
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert local_weights(model).digest == first.digest  # back as it was

    other = write_weights(tmp_path / "other", seed=1)  # another checkpoint of the same shape and times
    for name in ("model.safetensors", "config.json"):
        os.utime(other / name, ns=((model / name).stat().st_atime_ns, (model / name).stat().st_mtime_ns))
    assert local_weights(other).digest != first.digest

    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))  # touched
    assert local_weights(model).digest != first.digest
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    (model / "extra.bin").write_bytes(b"x")  # a new file
    assert local_weights(model).digest != first.digest
    (model / "extra.bin").unlink()
    (model / ".cache").mkdir()  # hidden entries (a download's bookkeeping) do not count
    (model / ".cache" / "lock").write_text("x")
    assert local_weights(model).digest == first.digest
    assert local_weights(weights).readable["files"] == 1  # a single-file checkpoint (GGUF)


def test_large_files_are_sampled_not_read_whole(tmp_path: Path) -> None:
    """Reading is bounded: a change between the samples of a large file with its time kept is
    not seen (docs/vllm.md says so); one in a sample is."""
    model = tmp_path / "m"
    model.mkdir()
    weights = model / "w.bin"
    weights.write_bytes(bytes(64 * SAMPLE_BYTES))
    stamp = weights.stat()
    first = local_weights(model).digest
    with weights.open("r+b") as f:
        f.seek(SAMPLE_BYTES * 2)  # between the first two samples (a sample every ~4.2 slices)
        f.write(b"\1")
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert local_weights(model).digest == first
    with weights.open("r+b") as f:
        f.seek(len(bytes(64 * SAMPLE_BYTES)) - 1)  # the last byte: in the last sample
        f.write(b"\1")
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert local_weights(model).digest != first


def test_hub_models_are_named_by_their_cached_commit(tmp_path: Path) -> None:
    commit_a, commit_b = "1" * 40, "2" * 40
    repo = tmp_path / "models--org--tiny"
    for commit in (commit_a, commit_b):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit_a)
    (repo / "refs" / "dev").write_text(commit_b)
    cache = str(tmp_path)
    assert hub_commit("org/tiny", None, cache) == commit_a
    assert hub_commit("org/tiny", "dev", cache) == commit_b
    assert hub_commit("org/tiny", "3" * 40, cache) == "3" * 40  # a pinned commit is its own answer
    assert hub_commit("org/absent", None, cache) is None
    (repo / "refs" / "main").write_text(commit_b)  # the branch moved: new weights, new identity
    assert hub_commit("org/tiny", None, cache) == commit_b
    assert weights_of(str(tmp_path / "no-such-dir"), None) is None
