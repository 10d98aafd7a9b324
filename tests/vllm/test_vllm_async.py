"""The VUAS3Connector stays off vLLM's critical path: real engines, moto over HTTP.

Two engine processes share one store:

1. an offline script (``engine_run.py --no-shutdown``) stores three prompts and simply
   ends: every whole prompt group must be in the store (pending uploads are flushed at
   a normal interpreter exit);
2. ``engine_scenarios.py`` (prefix caching on) meets the store through a fault proxy in
   its own process, one phase per behaviour (see there): a slow store costs about one
   round trip, not one per request; a partial local hit reads only the missing groups;
   a corrupt object (one head of a group) mid-prefix is recomputed and stored again, and no fragment computed
   on it is ever uploaded; ``prompt_embeds`` requests are served and never touch the
   store; a decoding request keeps getting tokens while a new request's lookup hangs,
   after which the breaker keeps new requests off the store; the connector's metrics
   show up in ``LLM.get_metrics()``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import torch

from vua_s3 import VUAConfig
from vua_s3.fragment import decode
from vua_s3.manifest import is_manifest_key
from vua_s3.testing.moto import EMBEDDED_CREDENTIALS, EmbeddedS3

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-engines")]

HERE = Path(__file__).parent
REPO = HERE.parents[1]
SPLIT = 64
PROMPT_LEN = 280  # four whole groups stored (256 tokens), the rest prefilled
GROUPS = 4
KV_HEADS = 2  # the tiny model's: one object per group and KV head


def _env() -> dict[str, str]:
    """The engine imports this checkout's vua_s3, whatever the venv's editable install says."""
    return os.environ | {
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
        "AWS_ACCESS_KEY_ID": EMBEDDED_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": EMBEDDED_CREDENTIALS["aws_secret_access_key"],
    }


def _run(python: Path, *args: str) -> str:
    proc = subprocess.run([str(python), *args], capture_output=True, text=True, timeout=900, check=False, env=_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    return log


def test_connector_stays_off_the_engine_path(vllm_python: Path, tiny_llama: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (PROMPT_LEN,), generator=gen).tolist() for _ in range(3)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    with EmbeddedS3() as s3:
        client, prefix = s3.client(), "async"

        def objects() -> dict[str, bytes]:
            listing = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix + "/").get("Contents", [])
            return {
                o["Key"][len(prefix) + 1 :]: client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
                for o in listing
                if not is_manifest_key(o["Key"][len(prefix) + 1 :])
            }

        # 1. An offline script that generates and simply ends.
        _run(vllm_python, str(HERE / "engine_run.py"), str(tiny_llama), s3.url(prefix), str(tmp_path / "prompts.json"),
             str(tmp_path / "clean.json"), "--split-factor", str(SPLIT), "--no-shutdown")  # fmt: skip
        clean_out = json.loads((tmp_path / "clean.json").read_text())["outputs"]
        clean = objects()
        assert len(clean) == 3 * GROUPS * KV_HEADS, sorted(clean)
        namespace = next(iter(clean)).split("/")[0]
        cfg = VUAConfig(split_factor=SPLIT, namespace=namespace)
        # keys: head 0's object per group; every_head: all of them, group by group.
        keys = [cfg.tokens_to_paths(torch.tensor(p[: SPLIT * GROUPS])) for p in prompts]
        every_head = [cfg.tokens_to_paths(torch.tensor(p[: SPLIT * GROUPS]), kv_heads=KV_HEADS) for p in prompts]
        assert set(clean) == {k for ks in every_head for k in ks}

        # Head 0 of group 1 of prompt 1 becomes garbage of the same size.
        bad = keys[1][1]
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{bad}", Body=random.Random(1).randbytes(len(clean[bad])))

        # 2. One engine, every scenario.
        log = _run(vllm_python, str(HERE / "engine_scenarios.py"), str(tiny_llama), str(s3.port), s3.bucket, prefix,
                   str(tmp_path / "prompts.json"), str(tmp_path / "report.json"))  # fmt: skip
        report: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())
        final = objects()

    def paths(requests: list[list[str]], method: str) -> list[str]:
        return [p.split(f"/{prefix}/", 1)[1] for m, p, _ in requests if m == method and f"/{prefix}/" in p]

    def probes(requests: list[list[str]]) -> list[str]:
        """The groups the lookups probed: one LIST of a group's head objects each (the prefix listed)."""
        listed = [parse_qs(q).get("prefix", [""])[0] for m, _, q in requests if m == "GET" and "list-type=2" in q]
        return [p.split(f"{prefix}/", 1)[1] for p in listed if p.startswith(f"{prefix}/")]

    def group_prefix(key: str) -> str:
        return key.rsplit(".h", 1)[0] + ".h"

    # A slow store (0.5 s per response) costs the engine about one lookup round trip for
    # 8 new prompts, where answering each in turn would cost 8.
    delay = report["delay"]
    added = delay["slow_s"] - delay["fast_s"]
    lists = len(probes(delay["requests"]))
    print(f"8 new prompts: {delay['fast_s']:.2f} s fast store, {delay['slow_s']:.2f} s with 0.5 s responses "
          f"(+{added:.2f} s; {lists} LISTs, serial would be >= {8 * 0.5:.1f} s)")  # fmt: skip
    assert lists == 8 * 2 and not paths(delay["requests"], "HEAD")
    assert added < 8 * 0.5 / 2

    # Partial local hit: R reads group 0 of prompt 0 only; prompt 0 itself then has its
    # first 96 tokens in the local prefix cache and probes and reads groups 1..3 only.
    r = report["partial_r"]
    assert sorted(paths(r["requests"], "GET")) == sorted(every_head[0][:KV_HEADS])
    x0 = report["partial_x0"]
    assert sorted(probes(x0["requests"])) == sorted(map(group_prefix, keys[0][1:]))
    assert sorted(paths(x0["requests"], "GET")) == sorted(every_head[0][KV_HEADS:])
    (out,) = x0["out"]
    assert out["num_cached_tokens"] == SPLIT * GROUPS
    assert out["kv_transfer_params"]["vua_s3"]["hit_tokens"] == SPLIT * GROUPS - 96
    assert out["tokens"] == clean_out[0]["tokens"][:4]

    # Corrupt group 1 of prompt 1: recomputed, the output is unchanged, groups 1..3 are
    # stored again once each, and every object in the store holds a clean engine's KV.
    (out,) = report["corrupt"]["out"]
    assert out["tokens"] == clean_out[1]["tokens"][:4]
    assert out["kv_transfer_params"]["vua_s3"]["hit_tokens"] == SPLIT
    assert Counter(paths(report["corrupt"]["requests"], "PUT")) == Counter(every_head[1][KV_HEADS:])
    assert "Recovered from KV load failure" in log
    assert set(clean) <= set(final)
    for key, data in clean.items():
        stored, reference = decode(bytearray(final[key])), decode(bytearray(data))
        assert torch.equal(stored.tokens, reference.tokens)
        torch.testing.assert_close(stored.kv, reference.kv, rtol=1e-4, atol=1e-4)

    # prompt_embeds: served, the store never asked.
    assert report["embeds"]["tokens"] == 4
    assert report["embeds"]["requests"] == []

    # Metrics, as LLM.get_metrics() shows them.
    metrics = report["metrics"]
    for name in ("lookups", "hit_tokens", "loaded_tokens", "load_bytes", "stored_groups", "store_bytes",
                 "load_failures"):  # fmt: skip
        assert metrics.get(f"vllm:vua_s3_{name}", 0) > 0, (name, metrics)

    # Hung lookups: while B's probes hang, A keeps decoding; B is served after the lookup
    # timeout, and the breaker keeps C off the store.
    timeline = report["hung"]["timeline"]
    while_held = [a for _, a, b, held in timeline if held and b == 0]
    assert len(while_held) >= 3 and while_held[-1] - while_held[0] >= 3, timeline[:40]
    assert timeline[-1][2] == 4
    assert report["hung"]["c_heads"] == 0
    assert log.count("VUAS3Connector: lookup in") == 1, log[-6000:]
