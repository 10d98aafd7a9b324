"""The vua-s3 command, run as a user runs it: a separate process."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import random_kvcache

from vua_s3 import VUA, VUAConfig


def vua_s3(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vua_s3.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_demo_on_the_embedded_server_reports_and_verifies() -> None:
    out = vua_s3("demo", "--model", "tiny", "--tokens", "1000", "--split-factor", "64")
    assert out.returncode == 0, out.stderr
    assert "embedded S3 server (moto) on http://127.0.0.1:" in out.stdout
    assert "960 tokens = 15 groups of 64" in out.stdout
    assert "15 objects" in out.stdout and "0 objects" in out.stdout  # second put is probe-only
    assert "960 tokens hit" in out.stdout and "448 tokens hit" in out.stdout and "0 tokens hit" in out.stdout
    assert "round trip bit-exact: yes" in out.stdout
    assert "cores" in out.stdout  # the machine is described


def test_demo_on_a_given_url(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = vua_s3("demo", "--url", str(tmp_path), "--model", "tiny", "--tokens", "256", "--split-factor", "64")
    assert out.returncode == 0, out.stderr
    assert "round trip bit-exact: yes" in out.stdout
    assert (tmp_path / "demo-tiny").is_dir()


def test_stats_and_ls(location: str) -> None:
    tokens = torch.arange(64)
    for namespace, count in (("model-a", 64), ("model-b", 32)):
        with VUA(VUAConfig(split_factor=16, namespace=namespace), location) as vua:
            vua.put(tokens[:count], random_kvcache(seq_len=count))
    out = vua_s3("stats", location)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}
    # two KV heads: two objects per group
    assert lines["model-a"][1:4] == ["8", "4", "0"] and lines["model-b"][1:3] == ["4", "2"]
    assert lines["total"][1:3] == ["12", "6"]

    out = vua_s3("ls", location)
    assert out.returncode == 0, out.stderr
    assert "model-a/\t8 objects\t4 groups" in out.stdout and "model-b/\t4 objects\t2 groups" in out.stdout

    out = vua_s3("ls", location, "model-b")
    keys = VUAConfig(split_factor=16, namespace="model-b").tokens_to_paths(tokens[:32], kv_heads=2)
    assert sorted(line.split()[-1] for line in out.stdout.splitlines()) == sorted(keys)


def test_cli_errors_are_clear() -> None:
    out = vua_s3("stats", "gs://bucket/x")
    assert out.returncode == 1 and "unknown URL scheme 'gs'" in out.stderr and "Traceback" not in out.stderr
    out = vua_s3("demo", "--tokens", "0")
    assert out.returncode == 2 and "must be a positive integer" in out.stderr
