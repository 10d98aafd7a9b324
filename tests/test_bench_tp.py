"""``vua-s3 bench-tp`` runs end to end, small, and its counts are the layout's."""

from __future__ import annotations

import json

import pytest
from conftest import unique_prefix

from vua_s3.cli.main import main
from vua_s3.testing.moto import EmbeddedS3


def test_bench_tp_counts_requests_and_bytes_per_group(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench-tp", "--models", "tiny,llama3.2-1b", "--writers", "1,2,4", "--readers", "1,4,8"]
    assert main([*argv, "--split-factor", "16", "--groups", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["model"], r["writer_tp"], r["reader_tp"]): r for r in result["rows"]}
    assert set(rows) == {(m, w, r) for m in ("tiny", "llama3.2-1b") for w in (1, 2, 4) for r in (1, 4, 8)}
    for (model, _, reader), row in rows.items():
        heads = row["kv_heads"]
        assert heads == (2 if model == "tiny" else 8)
        assert row["exact"]
        assert row["puts_per_group"] == heads  # each head once, whatever the writer's TP size
        # one lookup of 3 groups for every head: first, last and middle group probed, one LIST each, one wave
        assert (row["lookup_lists"], row["lookup_heads"], row["lookup_waves"]) == (3, 0, 1)
        assert row["gets_per_group"] == max(heads, reader)  # a replicated head is read by each rank holding it
        assert row["mib_read_per_group"] == pytest.approx(row["mib_written_per_group"] * max(heads, reader) / heads)
        assert row["lookup_store_requests"] is None  # a POSIX store counts nothing itself

    assert main([*argv[:2], "tiny", "--writers", "2", "--readers", "1", "--split-factor", "16"]) == 0
    assert "| tiny | 2 | 2 | 1 | 2 | 2 + 0 | 1 | 2 |" in capsys.readouterr().out


def test_bench_tp_on_s3_deletes_what_it_stored(moto_server: EmbeddedS3, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    argv = ["bench-tp", "--url", moto_server.url(prefix), "--models", "tiny", "--writers", "2", "--readers", "2"]
    assert main([*argv, "--split-factor", "16", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["exact"] and row["lookup_lists"] == 2
    assert row["lookup_store_requests"] == {"list_objects_v2": 2}  # as the S3 store counted them
    listing = moto_server.client().list_objects_v2(Bucket=moto_server.bucket, Prefix=prefix)
    assert listing.get("KeyCount") == 0, "the bench deletes what it stored"


def test_bench_tp_refuses_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench-tp", "--models", "tiny,gpt-9"])
    assert "unknown model 'gpt-9'" in capsys.readouterr().err
