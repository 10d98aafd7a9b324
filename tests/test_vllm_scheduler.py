"""The connector's scheduler side without an engine: a preempted request is looked up again
when it resumes, multimodal inputs are part of the key, ``prompt_embeds`` is never looked up.
Real lookups on a POSIX store through the connector's loop; requests are stand-ins with the
fields the scheduler side reads."""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from collections.abc import Sequence
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
from vua_s3.storage.base import ObjectInfo
from vua_s3.storage.posix import PosixStore
from vua_s3.testing.counting import CountingStore
from vua_s3.vua import AsyncVUA

SPLIT = 16
BLOCK = 8
NAMESPACE = "sched-test"
HEADS = HeadRange.all(2)
PROMPT = list(range(100, 141))  # 41 tokens: 2 whole groups usable (vLLM computes the last one)


def image(identifier: str, offset: int = 3, length: int = 8) -> Any:
    return SimpleNamespace(identifier=identifier, mm_position=SimpleNamespace(offset=offset, length=length))


def request(req_id: str, *, media: list[Any] | None = None, embeds: Any = None, prompt: list[int] = PROMPT) -> Any:
    return SimpleNamespace(
        request_id=req_id,
        prompt_token_ids=prompt,  # with embeddings, placeholder ids stand where they go
        prompt_embeds=embeds,
        mm_features=media,
        lora_request=None,
        cache_salt=None,
    )


class HeldStore(CountingStore):
    """Probes wait until ``released`` is set: a store that is slow, or hung."""

    def __init__(self, inner: PosixStore) -> None:
        super().__init__(inner)
        self.released = threading.Event()

    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        await asyncio.to_thread(self.released.wait)
        return await super().head_many(keys)

    async def head_siblings(self, sets: Sequence[Sequence[str]]) -> list[list[ObjectInfo | None]]:
        await asyncio.to_thread(self.released.wait)
        return await super().head_siblings(sets)


class Scheduler:
    """A SchedulerSide on a POSIX store (its probes counted), with what it recorded."""

    def __init__(
        self, root: Path, *, save: bool = False, share_loads: bool = True, held: bool = False, **extra: Any
    ) -> None:
        self.settings = ConnectorSettings(url=str(root), split_factor=SPLIT, **extra)
        self.loop = BackgroundLoop()
        self.stats = Recorder()
        breaker = Breaker(logging.getLogger("test"), "store", "test", 10.0, 300.0, self.stats)
        self.store = (HeldStore if held else CountingStore)(PosixStore(root))
        self.probe = AsyncVUA(VUAConfig(split_factor=SPLIT, namespace=NAMESPACE), self.store)
        self.side = SchedulerSide(
            self.settings, [self.probe], self.loop, breaker, self.stats, BLOCK,
            heads=HEADS, load=True, save=save, where="test", share_loads=share_loads,
        )  # fmt: skip
        self.lookups = 0
        self.nones = 0

    def arrive(self, req: Any) -> None:
        """vLLM's add_request, then the store's answer (the engine is busy meanwhile)."""
        self.side.arrived(req)
        self.side.await_lookup(30)

    def matched(self, req: Any, computed: int = 0) -> tuple[int | None, bool]:
        """Ask as vLLM does, step after step, until the answer is there."""
        deadline = time.monotonic() + 30
        while True:
            answer = self.side.matched(req, computed)
            if answer[0] is not None or time.monotonic() > deadline:
                self.lookups += int(self.stats.take().get("lookups", 0))
                return answer
            self.nones += 1
            self.side.await_lookup(0.005)
            time.sleep(0.001)

    def close(self) -> None:
        self.loop.run(self.probe.close())
        self.loop.stop()


def store_prompt(root: Path, salt: str | None, prompt: list[int] = PROMPT) -> None:
    n = (len(prompt) - 1) // SPLIT * SPLIT
    kv = [(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)) for _ in range(2)]
    with VUA(VUAConfig(split_factor=SPLIT, namespace=NAMESPACE), str(root)) as vua:
        assert vua.put(torch.tensor(prompt[:n]), kv, salt=salt) == n // SPLIT


@pytest.fixture
def scheduler(tmp_path: Path) -> Any:
    s = Scheduler(tmp_path)
    yield s
    s.close()


def test_a_preempted_request_is_looked_up_again_when_it_resumes(tmp_path: Path) -> None:
    scheduler = Scheduler(tmp_path / "untrusting", known_stored_ttl_s=1e-9)  # nothing trusted: every answer asked
    try:
        store_prompt(tmp_path / "untrusting", None)
        req = request("r1")
        assert scheduler.side.matched(req, 0) in ((None, False), (32, True))  # None while the lookup runs
        assert scheduler.matched(req) == (32, True)
        assert scheduler.matched(req) == (32, True) and scheduler.lookups == 1  # answered once, remembered
        scheduler.side.plan(SimpleNamespace(total_num_scheduled_tokens=1, preempted_req_ids={"r1"}))
        assert scheduler.matched(req) == (32, True) and scheduler.lookups == 2  # its blocks are gone: asked again
    finally:
        scheduler.close()


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


def test_the_lookup_starts_when_the_request_arrives(tmp_path: Path, scheduler: Scheduler) -> None:
    """Answered by the time vLLM first asks, hit or miss: no step is spent waiting."""
    store_prompt(tmp_path, None)
    hit, miss = request("hit"), request("miss", prompt=list(range(500, 541)))
    scheduler.arrive(hit)
    scheduler.arrive(miss)
    assert scheduler.store.lists == 2 + 2  # both lookups went out on arrival
    assert scheduler.side.matched(hit, 0) == (32, True)
    assert scheduler.side.matched(miss, 0) == (0, False)


async def _stall(seconds: float) -> None:
    time.sleep(seconds)  # holds the loop: what is submitted meanwhile waits


def test_requests_arriving_together_share_one_probe(tmp_path: Path, scheduler: Scheduler) -> None:
    """The second of two requests on one prefix joins the first's probe of it and probes
    only its own group past it; past a miss, nothing the second probed counts."""
    store_prompt(tmp_path, None)
    for shared, found in ((PROMPT[:32], 32), (list(range(300, 332)), 0)):
        a, b = request("a", prompt=[*shared, *range(700, 725)]), request("b", prompt=[*shared, *range(800, 825)])
        lists = scheduler.store.lists
        scheduler.loop.submit(_stall(0.3))  # both arrive before either probe runs
        scheduler.side.arrived(a)
        scheduler.side.arrived(b)
        answers = (found, True) if found else (0, False)
        assert scheduler.matched(a) == answers and scheduler.matched(b) == answers
        assert scheduler.store.lists - lists == 3 + 1  # a: its 3 groups; b: its third
        for req in (a, b):
            scheduler.side.finished(req.request_id)


def test_a_recent_hit_is_trusted_and_a_miss_never_is(tmp_path: Path, scheduler: Scheduler) -> None:
    store_prompt(tmp_path, None)
    scheduler.arrive(request("r1"))
    assert scheduler.matched(request("r1")) == (32, True)
    asked = scheduler.store.lists
    assert asked == 2
    scheduler.arrive(request("r2"))  # the same prompt: its groups were just found
    assert scheduler.matched(request("r2")) == (32, True) and scheduler.nones == 0
    assert scheduler.store.lists == asked and scheduler.lookups == 1
    fresh = list(range(500, 541))
    for name in ("m1", "m2"):  # a miss is asked again every time
        scheduler.arrive(request(name, prompt=fresh))
        assert scheduler.matched(request(name, prompt=fresh)) == (0, False)
    assert scheduler.store.lists == asked + 2 * 2  # both groups probed, both times


def test_trust_is_bounded(tmp_path: Path) -> None:
    """``known_stored_max`` groups at most, each for ``known_stored_ttl_s``."""
    for extra in ({"known_stored_max": 1}, {"known_stored_ttl_s": 1e-9}):
        scheduler = Scheduler(tmp_path / str(extra), **extra)
        try:
            store_prompt(tmp_path / str(extra), None)
            for name in ("r1", "r2"):
                scheduler.arrive(request(name))
                assert scheduler.matched(request(name)) == (32, True)
            assert scheduler.lookups == 2, extra  # the first group was forgotten, so asked again
        finally:
            scheduler.close()


def test_a_trusted_group_that_fails_to_load_is_recomputed_saved_and_asked_again(tmp_path: Path) -> None:
    scheduler = Scheduler(tmp_path, save=True)
    try:
        store_prompt(tmp_path, None)
        scheduler.arrive(request("r1"))
        assert scheduler.matched(request("r1")) == (32, True)
        for path in tmp_path.rglob("*.safetensors"):  # gone behind the trust (gc, expiry)
            path.unlink()
        scheduler.arrive(request("r2"))
        assert scheduler.matched(request("r2")) == (32, True) and scheduler.lookups == 1  # trusted
        scheduler.side.allocated(request("r2"), list(range(6)), 32)
        (load,) = scheduler.side.plan(step([])).loads
        # The worker finds nothing: every block is reported unfilled; vLLM recomputes them.
        scheduler.side.loads_reported({"r2"}, set(load.block_ids))
        saves = scheduler.side.plan(step([("r2", 0, 41)])).saves
        assert [(s.spans[0].first, s.spans[0].stop, s.repair) for s in saves] == [(0, 2, True)]
        scheduler.arrive(request("r3"))
        assert scheduler.matched(request("r3")) == (0, False) and scheduler.lookups == 2  # no longer trusted
    finally:
        scheduler.close()


def step(new: list[tuple[str, int, int]]) -> Any:
    """A SchedulerOutput: requests ``(id, computed, scheduled)`` scheduled for the first time."""
    return SimpleNamespace(
        total_num_scheduled_tokens=sum(n for _, _, n in new),
        preempted_req_ids=set(),
        scheduled_new_reqs=[
            SimpleNamespace(req_id=r, block_ids=(list(range(i * 6, i * 6 + 6)),), num_computed_tokens=c)
            for i, (r, c, _) in enumerate(new)
        ],
        num_scheduled_tokens={r: n for r, _, n in new},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(),
                                              num_computed_tokens=[]),
    )  # fmt: skip


def test_one_load_per_group_in_flight(tmp_path: Path, scheduler: Scheduler) -> None:
    """A second request needing groups another is loading waits for that load, then finds
    them in vLLM's prefix cache; without a prefix cache there is nothing to wait for."""
    store_prompt(tmp_path, None)
    first, second = request("first"), request("second")
    scheduler.arrive(first)
    scheduler.arrive(second)
    assert scheduler.side.matched(first, 0) == (32, True)
    scheduler.side.allocated(first, list(range(6)), 32)
    assert scheduler.side.matched(second, 0) == (None, False)  # first is loading those groups
    assert len(scheduler.side.plan(step([])).loads) == 1
    assert scheduler.side.matched(second, 0) == (None, False)
    scheduler.side.loads_reported({"first"}, set())
    assert scheduler.side.matched(second, 32) == (0, False)  # now in the local prefix cache
    assert scheduler.side.matched(request("third"), 16) == (16, True)  # the load landed: nothing waits

    alone = Scheduler(tmp_path, share_loads=False)  # prefix caching off: waiting would gain nothing
    try:
        for name in ("a", "b"):
            alone.arrive(request(name))
            assert alone.side.matched(request(name), 0) == (32, True)
            alone.side.allocated(request(name), list(range(6)), 32)
    finally:
        alone.close()


def test_one_upload_per_group(tmp_path: Path) -> None:
    """Two requests computing the same new groups in one step: one uploads them; a request
    whose groups a lookup just found uploads none of them."""
    scheduler = Scheduler(tmp_path, save=True)
    try:
        prompt = list(range(500, 549))  # 3 whole groups
        for name in ("a", "b"):
            scheduler.arrive(request(name, prompt=prompt))
            assert scheduler.side.matched(request(name, prompt=prompt), 0) == (0, False)
        saves = scheduler.side.plan(step([("a", 0, 49), ("b", 0, 49)])).saves
        assert [(s.req_id, s.spans[0].first, s.spans[0].stop) for s in saves] == [("a", 0, 3)]
        longer = [*prompt, *range(600, 616)]  # a's groups, in the local cache, and one more
        lists = scheduler.store.lists
        scheduler.arrive(request("c", prompt=longer))
        assert scheduler.matched(request("c", prompt=longer), 48) == (0, False)
        assert scheduler.store.lists == lists + 1  # the groups a uploads are not probed
        saves = scheduler.side.plan(step([("c", 48, len(longer) - 48)])).saves
        assert [(s.spans[0].first, s.spans[0].stop) for s in saves] == [(3, 4)]

        store_prompt(tmp_path, None)  # stored by another engine: found, so not uploaded again
        scheduler.arrive(request("d"))
        assert scheduler.matched(request("d"), 0) == (32, True)
        scheduler.side.allocated(request("d"), list(range(6)), 0)  # vLLM chose to compute them
        assert scheduler.side.plan(step([("d", 0, 41)])).saves == []
    finally:
        scheduler.close()


def test_groups_this_engine_stored_are_trusted(tmp_path: Path) -> None:
    """Once the workers report a request's groups stored, a request on them probes none:
    the upload is as good as a lookup's hit, and its object sizes serve the load."""
    scheduler = Scheduler(tmp_path, save=True)
    try:
        scheduler.arrive(request("a"))
        assert scheduler.matched(request("a")) == (0, False)
        (save,) = scheduler.side.plan(step([("a", 0, 41)])).saves
        store_prompt(tmp_path, None)  # what the workers upload
        sizes = scheduler.loop.run(scheduler.probe.stored_sizes(torch.tensor(PROMPT[:32]), heads=HEADS))
        scheduler.side.finished("a")
        scheduler.side.uploaded(zip(save.spans[0].digests, [(size,) for size in sizes], strict=True))
        lists = scheduler.store.lists
        scheduler.arrive(request("b"))  # not in the local prefix cache (evicted, say)
        assert scheduler.matched(request("b")) == (32, True) and scheduler.store.lists == lists
        scheduler.side.allocated(request("b"), list(range(6)), 32)
        (load,) = scheduler.side.plan(step([])).loads
        assert load.sizes == [sizes]
    finally:
        scheduler.close()


def test_per_step_messages_do_not_grow_with_the_prompt(tmp_path: Path) -> None:
    """Chunked prefill of a long prompt: each chunk's plan names its own groups only."""
    scheduler = Scheduler(tmp_path, save=True)
    try:
        prompt = [1000 + i % 900 for i in range(64 * SPLIT + 1)]
        req = request("long", prompt=prompt)
        scheduler.arrive(req)
        assert scheduler.matched(req) == (0, False)
        chunk = 4 * SPLIT
        blocks = list(range(len(prompt) // BLOCK + 1))
        sizes = []
        for done in range(0, 64 * SPLIT, chunk):
            new = step([("long", 0, chunk)]) if not done else step([])
            if done:
                new.total_num_scheduled_tokens = chunk
                new.num_scheduled_tokens = {"long": chunk}
                new.scheduled_cached_reqs = SimpleNamespace(
                    req_ids=["long"], new_block_ids=[(blocks[done // BLOCK : (done + chunk) // BLOCK],)],
                    resumed_req_ids=set(), num_computed_tokens=[done],
                )  # fmt: skip
            else:
                new.scheduled_new_reqs[0].block_ids = (blocks[: chunk // BLOCK],)
            plan = scheduler.side.plan(new)
            (save,) = plan.saves
            assert save.spans[0].first == done // SPLIT and len(save.tokens) == chunk
            sizes.append(len(pickle.dumps(plan)))
        assert max(sizes) <= min(sizes) * 1.1, sizes  # the first chunk's size, at every chunk
    finally:
        scheduler.close()


def test_trust_settings_are_checked() -> None:
    settings = ConnectorSettings.from_extra_config({"url": "s3://b/p", "known_stored_ttl_s": 5, "known_stored_max": 9})
    assert (settings.known_stored_ttl_s, settings.known_stored_max) == (5, 9)
    for bad in ({"known_stored_ttl_s": 0}, {"known_stored_ttl_s": float("inf")}, {"known_stored_max": 0},
                {"known_stored_max": 1.5}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            ConnectorSettings.from_extra_config({"url": "s3://b/p", **bad})


def test_a_lookup_answered_in_the_window_joins_the_step_being_scheduled(tmp_path: Path) -> None:
    """vLLM schedules right after a request arrives: a lookup answered within ``lookup_wait_s``
    of the arrival is taken in that first ask, not one step later."""
    store_prompt(tmp_path, None)
    scheduler = Scheduler(tmp_path, lookup_wait_s=4.0)  # wider than any local lookup takes
    try:
        req = request("r1")
        scheduler.side.arrived(req)
        assert scheduler.side.matched(req, 0) == (32, True)
    finally:
        scheduler.close()


def test_a_hung_store_holds_the_scheduler_once_per_request(tmp_path: Path) -> None:
    wait = 0.5
    scheduler = Scheduler(tmp_path, held=True, lookup_wait_s=wait)
    try:
        req = request("r1")
        scheduler.side.arrived(req)
        assert scheduler.side.matched(req, 0) == (None, False)  # waited for the window, then went on
        assert scheduler.stats.take()["lookup_wait_seconds"] > 0
        time.sleep(wait)  # past the window, whatever the first wait took
        for _ in range(3):  # the next steps: asked again, never waited for
            assert scheduler.side.matched(req, 0) == (None, False)
        assert "lookup_wait_seconds" not in scheduler.stats.take()
        scheduler.store.released.set()
        assert scheduler.matched(req) == (0, False)  # the late answer: a miss, the request prefills
    finally:
        scheduler.store.released.set()
        scheduler.close()


def test_lookup_wait_is_checked() -> None:
    assert ConnectorSettings.from_extra_config({"url": "s3://b/p"}).lookup_wait_s == 0.02
    assert ConnectorSettings.from_extra_config({"url": "s3://b/p", "lookup_wait_s": 0}).lookup_wait_s == 0
    for bad in (-0.1, 5, True, "0.02", float("nan")):
        with pytest.raises(ValueError, match="lookup_wait_s"):
            ConnectorSettings.from_extra_config({"url": "s3://b/p", "lookup_wait_s": bad})


def test_a_reset_reuses_nothing_stored_before(tmp_path: Path, scheduler: Scheduler) -> None:
    store_prompt(tmp_path, None)
    assert scheduler.matched(request("before")) == (32, True)
    probed = scheduler.probe.probe_requests
    assert probed >= 2  # what lookup_heads reports: the groups asked about, one request each
    scheduler.side.reset()
    assert scheduler.matched(request("before")) == (0, False)  # tracked before: no more store use
    assert scheduler.matched(request("after")) == (0, False)  # a new epoch: keys no one wrote
    assert scheduler.lookups == 2 and scheduler.probe.probe_requests > probed
