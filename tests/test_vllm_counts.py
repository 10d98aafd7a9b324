"""The connector's counting without an engine: a gauge that stays reported while it is
up, and groups counted stored once every writing rank stored its heads, with the object
size of each pipeline stage."""

from __future__ import annotations

import pytest

from vua_s3.integrations.vllm.stats import Recorder
from vua_s3.integrations.vllm.uploads import Settled, Uploads


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
        uploads.queued("r", group, b"key-%d" % group, f"event-{group}")
    rank0 = [Settled("r", 0, 0, 100), Settled("r", 1, 0, 100), Settled("r", 2, 0, None)]
    assert uploads.settled(rank0) == ([], [])
    rank1 = [Settled("r", group, 0, 100) for group in range(3)]
    assert uploads.settled(rank1) == ([(b"key-0", (100,)), (b"key-1", (100,))], ["event-0", "event-1"])
    assert len(uploads) == 0  # group 2 is not stored: rank 0 failed its head
    assert uploads.settled([Settled("r", 0, 0, 100), Settled("other", 5, 0, 100)]) == ([], [])  # not pending


def test_a_stored_group_has_each_stage_s_object_size() -> None:
    """Pipeline stages store their own layers: the sizes a later load of the group needs."""
    uploads: Uploads[str] = Uploads(writers=1, stages=2)
    uploads.queued("r", 0, b"key", None)
    assert uploads.settled([Settled("r", 0, 1, 70)]) == ([], [])
    assert uploads.settled([Settled("r", 0, 0, 90)]) == ([(b"key", (90, 70))], [])


def test_uploads_need_a_writer() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Uploads(writers=0)
