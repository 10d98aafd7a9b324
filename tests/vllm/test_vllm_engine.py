"""The VUAS3Connector in real vLLM engines, against S3 (moto over HTTP) and POSIX.

Three fresh engine processes share one store:

A. fills it: no hit, and every whole prompt group appears as a fragment that
   ``VUA.get_closest`` reads, holding the same K and V as Hugging Face transformers
   computes for the checkpoint (the connector writes the shared format, correctly);
B. reuses it: the connector reports a hit, and the greedy output equals A's;
C. meets two kinds of tampering, one per prompt:
   * prompt 1's fragments are rewritten by ``VUA.put`` with noise KV (valid
     fragments, wrong numbers): C loads them and its output changes, which proves
     the loaded KV is really used (and that the connector reads what VUA writes);
   * prompt 2's fragments are overwritten with random bytes: the checksum catches
     it, vLLM recomputes the blocks ("Recovered from KV load failure"), the output
     equals A's, and the connector stores the recomputed groups again.

With S3, a fourth engine D points at an endpoint where nothing listens: the first
failed lookup opens the breaker (logged once, with its cause), nothing is uploaded,
and the output is A's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from stored import connector_config

from vua_s3 import VUA
from vua_s3.manifest import is_manifest_key
from vua_s3.testing.moto import EMBEDDED_CREDENTIALS, EMBEDDED_REGION, EmbeddedS3, free_port

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-engines")]

RUNNER = Path(__file__).with_name("engine_run.py")
HF_CHECK = Path(__file__).with_name("hf_kv_check.py")
SPLIT = 64
PROMPT_LEN = 150  # two whole groups stored (128 tokens), the rest prefilled
STORED = PROMPT_LEN - 1 - (PROMPT_LEN - 1) % SPLIT


@dataclass
class Backend:
    """One store as the engines see it (``url``) and as the test pokes at it."""

    url: str
    location: str
    keys: Callable[[], list[str]]
    read: Callable[[str], bytes]
    write: Callable[[str, bytes], object]
    delete: Callable[[str], object]


@pytest.fixture(params=["s3", "posix"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    if request.param == "posix":
        root = tmp_path / "store"
        root.mkdir()
        yield Backend(
            url=str(root),
            location=str(root),
            keys=lambda: sorted(str(p.relative_to(root)) for p in root.rglob("*.safetensors")),
            read=lambda key: (root / key).read_bytes(),
            write=lambda key, data: (root / key).write_bytes(data),
            delete=lambda key: (root / key).unlink(),
        )
        return
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", EMBEDDED_CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", EMBEDDED_CREDENTIALS["aws_secret_access_key"])
    with EmbeddedS3() as s3:
        client, bucket, prefix = s3.client(), s3.bucket, "engines/"

        def keys() -> list[str]:
            listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
            return sorted(o["Key"][len(prefix) :] for o in listing if not is_manifest_key(o["Key"][len(prefix) :]))

        yield Backend(
            url=s3.url(prefix.rstrip("/")),
            location=s3.url(prefix.rstrip("/")),
            keys=keys,
            read=lambda key: client.get_object(Bucket=bucket, Key=prefix + key)["Body"].read(),
            write=lambda key, data: client.put_object(Bucket=bucket, Key=prefix + key, Body=data),
            delete=lambda key: client.delete_object(Bucket=bucket, Key=prefix + key),
        )


def run_engine(python: Path, model: Path, url: str, prompts: list[list[int]], work: Path, name: str,
               *extra: str) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    """One engine in a fresh process: its per-prompt outputs and its log."""
    (work / "prompts.json").write_text(json.dumps(prompts))
    out = work / f"{name}.json"
    proc = subprocess.run(
        [str(python), str(RUNNER), str(model), url, str(work / "prompts.json"), str(out),
         "--split-factor", str(SPLIT), *extra],
        capture_output=True, text=True, timeout=900, check=False,
        env=os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"engine {name} failed:\n{log[-6000:]}"
    return json.loads(out.read_text())["outputs"], log


def test_engines_share_kv_through_the_store(
    backend: Backend, vllm_python: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (PROMPT_LEN,), generator=gen).tolist() for _ in range(2)]

    # A: cold store.
    a, _ = run_engine(vllm_python, tiny_llama, backend.url, prompts, tmp_path, "A")
    assert [o["kv_transfer_params"]["vua_s3"] for o in a] == [{"hit_tokens": 0, "stored_or_queued_tokens": STORED}] * 2
    keys = backend.keys()
    assert len(keys) == 2 * STORED // SPLIT * 2  # one object per group and KV head (the tiny model has 2)
    namespace = keys[0].split("/")[0]
    assert {k.split("/")[0] for k in keys} == {namespace}
    assert namespace.startswith(f"{tiny_llama.name}.float32.")
    assert ".tp" not in namespace  # one namespace for every tensor-parallel size
    cfg = connector_config(backend.location, namespace, SPLIT)
    with VUA(cfg, backend.location) as vua:
        stored = vua.get_closest(torch.tensor(prompts[1]))
    assert stored is not None and stored.tokens.tolist() == prompts[1][:STORED]
    assert [tuple(k.shape) for k, _ in stored.data] == [(1, 2, STORED, 64)] * 2
    check = subprocess.run(
        [str(vllm_python), str(HF_CHECK), str(tiny_llama), backend.location, namespace, str(SPLIT),
         json.dumps(prompts[1])],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr[-4000:]

    # B: a new engine finds both prompts in the store and answers the same.
    extra = ("--registered",) if backend.url.startswith("/") else ()  # POSIX run: plugin entry point
    b, _ = run_engine(vllm_python, tiny_llama, backend.url, prompts, tmp_path, "B", *extra)
    for out_a, out_b in zip(a, b, strict=True):
        assert out_b["kv_transfer_params"]["vua_s3"]["hit_tokens"] == STORED
        assert out_b["num_cached_tokens"] == STORED
        assert out_b["tokens"] == out_a["tokens"]

    # Tamper: prompt 0 gets valid fragments holding noise, prompt 1 gets garbage bytes.
    for key in cfg.tokens_to_paths(torch.tensor(prompts[0][:STORED])):
        backend.delete(key)
    noise = [(torch.randn(1, 2, STORED, 64, generator=gen) * 3, torch.randn(1, 2, STORED, 64, generator=gen) * 3)
             for _ in range(2)]  # fmt: skip
    with VUA(cfg, backend.location) as vua:
        assert vua.put(torch.tensor(prompts[0][:STORED]), noise) == STORED // SPLIT
    for key in cfg.tokens_to_paths(torch.tensor(prompts[1][:STORED])):
        size = len(backend.read(key))
        backend.write(key, random.Random(key).randbytes(size))

    c, log = run_engine(vllm_python, tiny_llama, backend.url, prompts, tmp_path, "C")
    # hit_tokens counts tokens actually loaded: none of prompt 1's.
    assert [o["kv_transfer_params"]["vua_s3"]["hit_tokens"] for o in c] == [STORED, 0]
    assert c[0]["tokens"] != a[0]["tokens"], "noise KV loaded from the store must change the output"
    assert c[1]["tokens"] == a[1]["tokens"], "a corrupt fragment must fall back to prefill"
    assert "VUAS3Connector: load from" in log
    assert "Recovered from KV load failure: 1 request(s) rescheduled" in log
    with VUA(cfg, backend.location) as vua:  # the recomputed groups replaced the garbage
        healed = vua.get_closest(torch.tensor(prompts[1]))
    assert healed is not None and healed.tokens.tolist() == prompts[1][:STORED]
    for (k0, v0), (k1, v1) in zip(stored.data, healed.data, strict=True):
        torch.testing.assert_close(k1, k0)
        torch.testing.assert_close(v1, v0)

    if not backend.url.startswith("s3://"):
        return
    down = f"s3://vua-cache/engines?endpoint_url=http://127.0.0.1:{free_port()}&region={EMBEDDED_REGION}&max_attempts=1"
    d, log = run_engine(vllm_python, tiny_llama, down, prompts, tmp_path, "D")
    assert [o["tokens"] for o in d] == [o["tokens"] for o in a]
    assert [o["kv_transfer_params"]["vua_s3"]["hit_tokens"] for o in d] == [0, 0]
    # The failed lookup opens the breaker (logged once); requests whose lookup failed
    # never try to upload, so the outage costs no upload either.
    assert log.count("VUAS3Connector: lookup in") == 1, log[-4000:]
    assert log.count("VUAS3Connector: upload to") == 0, log[-4000:]
