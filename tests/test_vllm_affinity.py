"""The connector's threads run behind the engine's: a lower priority for the calling thread
and the threads it starts, never for the rest of the process."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from vua_s3.integrations.vllm.affinity import run_behind
from vua_s3.integrations.vllm.settings import ConnectorSettings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")


def priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_run_behind_lowers_the_calling_thread_and_those_it_starts() -> None:
    before = priority()
    seen: dict[str, int] = {}

    def connector_thread() -> None:
        run_behind(frozenset(), 3)
        seen["self"] = priority()
        child = threading.Thread(target=lambda: seen.setdefault("child", priority()))
        child.start()
        child.join()

    thread = threading.Thread(target=connector_thread)
    thread.start()
    thread.join()
    assert seen == {"self": before + 3, "child": before + 3}
    assert priority() == before  # the engine's thread (here: the test's) keeps its own


def test_io_nice_is_checked() -> None:
    assert ConnectorSettings.from_extra_config({"url": "s3://b/p"}).io_nice == 10
    assert ConnectorSettings.from_extra_config({"url": "s3://b/p", "io_nice": 0}).io_nice == 0
    for bad in (-1, 20, 2.5, True, "10"):
        with pytest.raises(ValueError, match="io_nice"):
            ConnectorSettings.from_extra_config({"url": "s3://b/p", "io_nice": bad})
