"""``vua-s3 bench`` in a tiny configuration: it runs end to end and reports every figure.

No timing assertions: speed is the bench's output, not a test's verdict.
"""

from __future__ import annotations

import json

import pytest
from conftest import unique_prefix

from vua_s3.cli.main import main
from vua_s3.storage.s3.settings import crt_installed

FIGURE = {"seconds", "requests"}
RATE = {"gib_per_s", "cpu_s_per_gib"}


@pytest.mark.parametrize("server", ["moto", "seaweedfs"])
def test_bench_json_has_every_figure_beside_its_floor(server: str, capsys, request) -> None:  # type: ignore[no-untyped-def]
    """moto: the server the bench starts itself; SeaweedFS: the session's, given by URL."""
    where = ["--server", "moto"]
    if server == "seaweedfs":
        where = ["--url", request.getfixturevalue("seaweed_server").url(unique_prefix())]
    argv = ["bench", *where, "--model", "tiny", "--tokens", "64", "--split-factor", "16"]
    assert main([*argv, "--repeats", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["groups"] == 4 and report["tokens"] == 64 and report["repeats"] == 2
    assert report["shape"] == {"name": "tiny", "layers": 2, "kv_heads": 2, "head_dim": 16, "dtype": "BF16"}
    vua, floor = report["vua"], report["floor"]
    for name in ("put_cold", "get_cpu"):
        assert set(vua[name]) >= FIGURE | RATE
        assert len(vua[name]["seconds"]["samples"]) == 2
        stat = vua[name]["gib_per_s"]
        assert 0 < stat["min"] <= stat["median"] <= stat["max"]
    for name in ("put", "get_cpu"):
        assert set(floor[name]) >= {"seconds"} | RATE
    assert "seconds" in floor["head"]
    for name in ("put_stored", "put_stored_cached", "lookup_full", "lookup_half", "lookup_miss"):
        assert set(vua[name]) >= FIGURE
    # An already-stored prompt is probe-only: one LIST of a group's 2 head objects per probed
    # group (none when this process just stored it).
    assert vua["put_stored"]["requests"] == {"list_objects_v2": 4}
    assert vua["put_stored_cached"]["requests"] == {}
    assert vua["lookup_miss"]["requests"] == {"list_objects_v2": 4}
    assert vua["put_cold"]["requests"] == {"list_objects_v2": 4, "put_object": 8}  # one object per group and KV head
    assert report["checks"] == {
        "put_written": 4,
        "reput_written": 0,
        "get_cpu_tokens": 64,
        "lookup_full": 64,
        "lookup_half": 32,
        "lookup_miss": 0,
        "lookup_long": 64,  # 12 groups asked, the first 4 stored
        "vllm_load_groups": 4,
        "posix_get_tokens": 64,
        "original_get_tokens": 64,
    }
    assert vua["lookup_long"]["requests"] == {"list_objects_v2": 6}  # the search (probe_waves=4), not 12 probes
    assert set(vua["get_cold"]) >= RATE  # a new process's first get_closest
    assert set(floor["page_faults"]) >= RATE and set(floor["page_faults_huge"]) >= RATE
    assert set(vua["vllm_load"]) >= RATE
    # Server CPU beside client CPU where the server is a local process (SeaweedFS started by the
    # test session counts as given by URL: not measured; moto runs inside the bench's process).
    assert "server_cpu_s_per_gib" not in vua["get_cpu"]
    clients = report["clients"]
    assert set(clients) == ({"s3transfer", "awscrt"} if crt_installed() else {"s3transfer"})
    for client, figures in clients.items():
        awscrt = ("put", "get", "get_reused", "put_32mib", "get_32mib", "vllm_load")
        for name in awscrt if client == "awscrt" else ("put", "get"):
            assert set(figures[name]) >= RATE and len(figures[name]["seconds"]["samples"]) == 2
    posix = report["posix"]
    for side, names in (("vua", ("put", "get", "get_cold")), ("floor", ("put", "get")), ("original", ("put", "get"))):
        for name in names:
            assert set(posix[side][name]) >= RATE, (side, name)
    assert report["transport"] == ("crt" if crt_installed() else "aiobotocore")
    assert report["load_average"]["start"] and report["peak_rss_mib"] > 0
    assert set(report["ratios"]) >= {
        "put_vs_floor",
        "get_cpu_vs_floor",
        "lookup_full_vs_head",
        "lookup_miss_vs_head",
        "lookup_long_vs_head",
        "put_vs_s3transfer",
        "get_cpu_vs_s3transfer",
        "posix_put_vs_floor",
        "posix_get_vs_floor",
        "posix_put_vs_original",
        "posix_get_vs_original",
    }


def test_bench_table_names_the_floor(capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["bench", "--server", "moto", "--model", "tiny", "--tokens", "32", "--split-factor", "16"]
    assert main([*argv, "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "floor (plain aioboto3)" in out and "get_closest -> cpu" in out and "lookup (miss)" in out
    assert "s3transfer put" in out and "page faults of fresh memory" in out and "original VUA" in out
    assert "machine:" in out


def test_bench_on_its_own_seaweedfs_shows_server_cpu_and_the_long_prompt(seaweed_server, capsys) -> None:  # type: ignore[no-untyped-def]
    """(The session's server only proves SeaweedFS is installed; the bench starts its own.)"""
    argv = ["bench", "--server", "seaweedfs", "--model", "tiny", "--tokens", "32", "--split-factor", "16"]
    argv += ["--repeats", "1", "--no-posix", "--no-cold", "--long-tokens", "64", "--long-repeats", "1", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["server_cpu"] == "measured"
    for figure in (report["vua"]["get_cpu"], report["vua"]["vllm_load"], report["clients"]["awscrt"]["put"]):
        assert figure["server_cpu_s_per_gib"]["median"] >= 0
    long = report["long"]
    assert long["tokens"] == 64 and long["checks"] == {"put_written": 4, "get_cpu_tokens": 64, "vllm_load_groups": 4}
    for name in ("put_cold", "get_cpu", "vllm_load"):
        assert set(long["vua"][name]) >= RATE
    assert set(long["ratios"]) == {"put_vs_awscrt", "get_cpu_vs_awscrt", "vllm_load_vs_awscrt"}
