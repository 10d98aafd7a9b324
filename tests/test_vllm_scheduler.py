"""The connector's scheduler side without an engine: a preempted request is looked up again
when it resumes, multimodal inputs are part of the key, ``prompt_embeds`` is never looked up.
Real lookups on a POSIX store through the connector's loop; requests are stand-ins with the
fields the scheduler side reads."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vua_s3 import VUA, HeadRange, VUAConfig
from vua_s3.integrations.vllm.breaker import Breaker
from vua_s3.integrations.vllm.identity import request_salt
from vua_s3.integrations.vllm.scheduler import SchedulerSide
from vua_s3.integrations.vllm.settings import ConnectorSettings
from vua_s3.integrations.vllm.stats import Recorder
from vua_s3.loop import BackgroundLoop
from vua_s3.vua import AsyncVUA

SPLIT = 16
NAMESPACE = "sched-test"
HEADS = HeadRange.all(2)
PROMPT = list(range(100, 141))  # 41 tokens: 2 whole groups usable (vLLM computes the last one)


def image(identifier: str, offset: int = 3, length: int = 8) -> Any:
    return SimpleNamespace(identifier=identifier, mm_position=SimpleNamespace(offset=offset, length=length))


def request(req_id: str, *, media: list[Any] | None = None, embeds: Any = None) -> Any:
    return SimpleNamespace(
        request_id=req_id,
        prompt_token_ids=PROMPT,  # with embeddings, placeholder ids stand where they go
        prompt_embeds=embeds,
        mm_features=media,
        lora_request=None,
        cache_salt=None,
    )


class Scheduler:
    """A SchedulerSide on a POSIX store, with what it recorded."""

    def __init__(self, root: Path) -> None:
        self.settings = ConnectorSettings(url=str(root), split_factor=SPLIT)
        self.loop = BackgroundLoop()
        self.stats = Recorder()
        breaker = Breaker(logging.getLogger("test"), "store", "test", 10.0, 300.0, self.stats)
        self.probe = AsyncVUA(VUAConfig(split_factor=SPLIT, namespace=NAMESPACE), str(root))
        self.side = SchedulerSide(
            self.settings, [self.probe], self.loop, breaker, self.stats, SPLIT,
            heads=HEADS, load=True, save=False, where="test",
        )  # fmt: skip
        self.lookups = 0

    def matched(self, req: Any, computed: int = 0) -> tuple[int | None, bool]:
        """Ask as vLLM does, step after step, until the answer is there."""
        deadline = time.monotonic() + 30
        while True:
            answer = self.side.matched(req, computed)
            if answer[0] is not None or time.monotonic() > deadline:
                self.lookups += int(self.stats.take().get("lookups", 0))
                return answer
            time.sleep(0.005)

    def close(self) -> None:
        self.loop.run(self.probe.close())
        self.loop.stop()


def store_prompt(root: Path, salt: str | None) -> None:
    kv = [(torch.randn(1, 2, 32, 4), torch.randn(1, 2, 32, 4)) for _ in range(2)]
    with VUA(VUAConfig(split_factor=SPLIT, namespace=NAMESPACE), str(root)) as vua:
        assert vua.put(torch.tensor(PROMPT[:32]), kv, salt=salt) == 2


@pytest.fixture
def scheduler(tmp_path: Path) -> Any:
    s = Scheduler(tmp_path)
    yield s
    s.close()


def test_a_preempted_request_is_looked_up_again_when_it_resumes(tmp_path: Path, scheduler: Scheduler) -> None:
    store_prompt(tmp_path, None)
    req = request("r1")
    assert scheduler.side.matched(req, 0) in ((None, False), (32, True))  # None while the lookup runs
    assert scheduler.matched(req) == (32, True)
    assert scheduler.matched(req) == (32, True) and scheduler.lookups == 1  # answered once, remembered
    scheduler.side.plan(SimpleNamespace(total_num_scheduled_tokens=1, preempted_req_ids={"r1"}))
    assert scheduler.matched(req) == (32, True) and scheduler.lookups == 2  # its blocks are gone: looked up again


def test_multimodal_inputs_are_part_of_the_key(tmp_path: Path, scheduler: Scheduler) -> None:
    cat, dog = request("cat", media=[image("hash-of-cat")]), request("dog", media=[image("hash-of-dog")])
    moved = request("moved", media=[image("hash-of-cat", offset=5)])
    salts = {request_salt(scheduler.settings, r) for r in (cat, dog, moved, request("text"))}
    assert len(salts) == 4 and None in salts  # content and place of each input, and text-only
    store_prompt(tmp_path, request_salt(scheduler.settings, cat))
    assert scheduler.matched(cat) == (32, True)
    assert scheduler.matched(dog) == (0, False)  # same placeholder token ids, other image
    assert scheduler.matched(moved) == (0, False)
    assert scheduler.matched(request("text")) == (0, False)


def test_prompt_embeds_are_never_looked_up(tmp_path: Path, scheduler: Scheduler) -> None:
    store_prompt(tmp_path, None)
    assert scheduler.matched(request("e", embeds=torch.zeros(41, 8))) == (0, False)
    assert scheduler.lookups == 0


def test_a_reset_reuses_nothing_stored_before(tmp_path: Path, scheduler: Scheduler) -> None:
    store_prompt(tmp_path, None)
    assert scheduler.matched(request("before")) == (32, True)
    probed = scheduler.probe.probe_requests
    assert probed >= 2  # what lookup_heads reports: the groups asked about, one request each
    scheduler.side.reset()
    assert scheduler.matched(request("before")) == (0, False)  # tracked before: no more store use
    assert scheduler.matched(request("after")) == (0, False)  # a new epoch: keys no one wrote
    assert scheduler.lookups == 2 and scheduler.probe.probe_requests > probed
