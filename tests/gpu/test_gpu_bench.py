"""``vua-s3 bench-gpu`` in a tiny configuration: every figure beside its floors, bit-exact
checks true; without CUDA it says so and runs the CPU stand-in. No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch

from vua_s3.cli.main import main
from vua_s3.storage.s3.settings import crt_installed

pytestmark = pytest.mark.gpu

TINY = ["--layers", "2", "--tokens", "512", "--s3-tokens", "512", "--split-factor", "256", "--repeats", "2"]
POSIX_FLOORS = {"read", "h2d", "read_h2d", "d2h", "write", "d2h_write"}
S3_FLOORS = {"get", "h2d", "get_h2d", "d2h", "put", "d2h_put"}


def test_bench_gpu_reports_every_figure_beside_its_floors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench-gpu", *TINY, "--posix-dir", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)

    cuda = torch.cuda.is_available()
    assert report["cuda"] is cuda and report["repeats"] == 2
    assert (report["note"] is None) is cuda and ("no CUDA device" in captured.err) is not cuda
    assert report["shape"] == {"name": "custom", "layers": 2, "kv_heads": 8, "head_dim": 128, "dtype": "BF16"}
    for section, floors in (("posix", POSIX_FLOORS), ("s3", S3_FLOORS if crt_installed() else set())):
        data = report[section]
        assert data["bit_exact"] is True
        assert (data["tokens"], data["objects"], data["bytes_moved"]) == (512, 16, 512 * 2 * 2 * 8 * 128 * 2)
        assert set(data["floor"]) == floors
        for figure in [*data["vua"].values(), *data["floor"].values()]:
            stat = figure["gib_per_s"]
            assert len(figure["seconds"]["samples"]) == 2
            assert 0 < stat["min"] <= stat["median"] <= stat["max"]
    assert {"posix_get_vs_read_h2d", "posix_put_vs_d2h_write"} <= set(report["ratios"])
    assert ("s3_get_vs_get_h2d" in report["ratios"]) is crt_installed()


def test_bench_gpu_table_and_json_file(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    argv = ["bench-gpu", *TINY[:2], "--tokens", "256", "--repeats", "1", "--no-s3", "--posix-dir", str(tmp_path)]
    assert main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "floor read_h2d" in table and "vua_s3 get" in table and "s3 (" not in table
    assert json.loads(out.read_text())["s3"] is None
