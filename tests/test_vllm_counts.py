"""The connector's counting without an engine: a gauge that stays reported while it is
up, and groups counted stored once every writing rank stored its heads."""

from __future__ import annotations

import pytest

from vua_s3.integrations.vllm.stats import Recorder
from vua_s3.integrations.vllm.uploads import Uploads


def test_the_breaker_gauge_is_reported_while_open_and_once_when_it_closes() -> None:
    stats = Recorder()
    stats.level("breaker_open", 0.0)
    assert stats.take() == {}  # never open: nothing to say
    for _ in range(3):  # every interval while open, even with nothing else to report
        stats.level("breaker_open", 1.0)
        assert stats.take() == {"breaker_open": 1.0}
    stats.level("breaker_open", 0.0)
    assert stats.take() == {"breaker_open": 0.0}
    stats.level("breaker_open", 0.0)
    assert stats.take() == {}


def test_a_group_counts_stored_once_when_every_writer_stored_it() -> None:
    uploads: Uploads[str] = Uploads(writers=2)
    for group in range(3):
        uploads.queued("r", group, f"event-{group}")
    assert uploads.settled([("r", 0, True), ("r", 1, True), ("r", 2, False)]) == (0, [])  # rank 0
    assert uploads.settled([("r", 0, True), ("r", 1, True), ("r", 2, True)]) == (2, ["event-0", "event-1"])
    assert len(uploads) == 0  # group 2 is not stored: rank 0 failed its head
    assert uploads.settled([("r", 0, True), ("other", 5, True)]) == (0, [])  # nothing pending: ignored


def test_uploads_need_a_writer() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Uploads(writers=0)
