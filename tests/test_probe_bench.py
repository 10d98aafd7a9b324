"""``vua-s3 bench-lookup`` runs end to end against a real S3 server and cleans up after itself."""

from __future__ import annotations

import json

import pytest
from conftest import unique_prefix

from vua_s3.cli.main import main
from vua_s3.probe import worst_case
from vua_s3.testing.moto import EmbeddedS3


def test_bench_lookup_counts_requests_and_round_trips(
    moto_server: EmbeddedS3, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = unique_prefix()
    argv = ["bench-lookup", "--url", moto_server.url(prefix), "--groups", "6", "--waves", "1,4", "--repeats", "2"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lookups = [c for c in result["cases"] if c["operation"] == "lookup"]
    assert {(c["hit"], c["probe_waves"]) for c in lookups} == {(h, w) for h in (0, 1, 3, 5, 6) for w in (1, 4)}
    for case in lookups:
        if case["probe_waves"] == 1:
            assert case["heads_max"] == 6 and case["round_trips_max"] == 1
        else:
            assert case["heads_max"] <= worst_case(6, 4) and case["round_trips_max"] <= 4
    puts = {c["probe_waves"]: c for c in result["cases"] if c["operation"] == "put"}
    assert puts[1]["heads_max"] == 6 and puts[4]["heads_max"] < 6
    assert {c["operation"] for c in result["cases"]} == {"lookup", "put", "lookup (cold)"}
    listing = moto_server.client().list_objects_v2(Bucket=moto_server.bucket, Prefix=prefix)
    assert listing.get("KeyCount") == 0, "the bench deletes what it stored"

    assert main(argv) == 0
    assert "| lookup | 6 | 3 | 4 |" in capsys.readouterr().out


def test_bench_lookup_refuses_bad_lists(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench-lookup", "--groups", "8,x"])
    assert "comma-separated" in capsys.readouterr().err
