"""The connector's scheduler side: lookups in the background, loads and saves planned.

Nothing here waits on the store for longer than ``lookup_wait_s`` per arriving request.
A lookup is submitted when the request arrives (:meth:`SchedulerSide.arrived`); vLLM
schedules right after, so :meth:`SchedulerSide.matched` waits for the answer until the
lookup is ``lookup_wait_s`` old (requests arriving together share that window), and only
then answers ``None`` (vLLM asks again next step; the request misses one step).

Groups a recent lookup found or this engine stored are trusted for ``known_stored_ttl_s``
without asking again (misses never are); requests arriving together on one new prefix
share one probe of it; a group is loaded by one request at a time (the others wait for it
and find it in vLLM's prefix cache) and uploaded once. Hits are loaded asynchronously
(vLLM parks the request until the workers report it). After a store failure the breaker
sends new requests straight to prefill.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...keys import Span
from ...loop import BackgroundLoop, gather_or_cancel
from ...recent import Recent
from ...shards import HeadRange
from ...vua import AsyncVUA
from .breaker import Breaker
from .identity import request_salt
from .plan import LoadSpec, Plan, SaveSpec
from .settings import ConnectorSettings, cacheable
from .stats import Recorder

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


Answer = concurrent.futures.Future[list[list[int]]]
"""A lookup: per pipeline stage, the object sizes of the groups found, from its first group."""


@dataclass
class _Tracked:
    """Scheduler-side state of one request."""

    prompt: list[int]
    salt: str | None
    digests: list[list[bytes]]
    """Per pipeline stage, the chained digest of each whole prompt group (chained once)."""
    usable: bool
    done: int = 0
    """Leading prompt tokens known stored or already handed to a worker to save."""
    lookup: Answer | None = None
    lookup_from: int = 0
    """First group the lookup probed (those before were trusted or are being saved here)."""
    lookup_started: float = 0.0
    lookup_answered: float = 0.0
    """When the lookup's answer came (set on the loop thread)."""
    stored: int | None = None
    """Leading prompt tokens the store holds (or this engine holds), once the lookup answered."""
    sizes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Group -> its object size per pipeline stage (every KV head of a group has the same
    size, so they serve every TP rank), for the groups known stored."""
    counted: bool = False
    """Whether this answer's hit and miss tokens were counted (once, when allocated)."""
    asked_at: int = 0
    """The local prefix cache's tokens when vLLM last asked."""
    loading: tuple[int, int] | None = None
    """Tokens ``[start, end)`` being loaded, until the workers report the load."""
    load_started: float = 0.0
    saving: bool = False
    """Saves were planned since the request (re)started: its blocks are held once it
    finishes until the workers' copies of them are done."""
    loaded: int = 0
    repair_until: int = 0
    """Groups before this token whose load failed: their saves replace bad objects."""
    block_ids: list[int] = field(default_factory=list)


#: The longest an idle step waits for a lookup or load (seconds).
_IDLE_WAIT = 0.005


class SchedulerSide:
    """Lookups, load plans and save plans for the requests of one engine.

    ``share_loads``: vLLM's prefix cache is on, so a request that needs groups another
    is loading waits for that load and then finds them there."""

    def __init__(
        self,
        settings: ConnectorSettings,
        probes: Sequence[AsyncVUA],
        loop: BackgroundLoop,
        breaker: Breaker,
        recorder: Recorder,
        block_size: int,
        *,
        heads: HeadRange,
        load: bool,
        save: bool,
        where: str,
        share_loads: bool = True,
    ) -> None:
        self._settings = settings
        self._probes = list(probes)
        self._loop = loop
        self._breaker = breaker
        self._stats = recorder
        self._block_size = block_size
        self._heads = heads  # every head of the model: every rank loads, so all must be stored
        self._load = load
        self._save = save
        self._where = where
        self._share_loads = share_loads
        self._tracked: dict[str, _Tracked] = {}
        self._loads: list[LoadSpec] = []
        ttl, most = settings.known_stored_ttl_s, settings.known_stored_max
        self._known: Recent[bytes, tuple[int, ...]] = Recent(most, ttl)
        """Stage 0 digest -> sizes per stage, of groups a lookup or load found stored."""
        self._saving: Recent[bytes, str] = Recent(most, ttl)
        """Stage 0 digest -> the request that had it uploaded."""
        self._loading: dict[bytes, str] = {}
        """Stage 0 digest -> the request loading it now."""
        self._probing: Recent[bytes, tuple[Answer, int, list[bytes]]] = Recent(most, settings.lookup_timeout_s)
        """Stage 0 digest of a lookup's first group -> the lookup, the group it stops before
        and its request's stage 0 digests."""
        self._sending: set[str] = set()
        """Finished requests whose blocks vLLM holds until the workers' copies are done."""
        self._epoch: str | None = None
        """Set by :meth:`reset`: mixed into every new request's salt."""

    # ------------------------------------------------------------------ lookups

    def arrived(self, request: Request) -> None:
        """vLLM's ``on_new_request``: start the lookup now, not at the first scheduling look."""
        tracked = self._track(request)
        if self._wants_lookup(request, tracked, 0):
            self._start(tracked, 0, include_saving=True)

    def matched(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """vLLM's ``get_num_new_matched_tokens``: ``(None, False)`` while the lookup runs
        (or another request loads the same groups), then ``(n, True)`` for a hit of ``n``
        tokens past the local prefix cache."""
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            tracked = self._track(request)
        split = self._settings.split_factor
        local_groups = num_computed_tokens // split
        tracked.done = max(tracked.done, local_groups * split)
        tracked.asked_at = num_computed_tokens
        if not self._wants_lookup(request, tracked, local_groups):
            return 0, False
        if tracked.stored is None and tracked.lookup is None:
            self._start(tracked, local_groups, include_saving=False)
        if tracked.lookup is not None:
            if not tracked.lookup.done():
                self._wait_briefly(tracked.lookup, tracked.lookup_started)
            if not tracked.lookup.done():
                return None, False
            self._collect(tracked)
        assert tracked.stored is not None
        if any(g not in tracked.sizes for g in range(local_groups, tracked.lookup_from)):
            # Groups skipped as being saved here are not in the local cache: ask from there.
            tracked.stored = None
            return self.matched(request, num_computed_tokens)
        if tracked.stored <= num_computed_tokens:
            return 0, False
        if self._share_loads and self._loaded_elsewhere(request.request_id, tracked, local_groups):
            return None, False  # it lands in vLLM's prefix cache, or this request loads it then
        return tracked.stored - num_computed_tokens, True

    def _wait_briefly(self, lookup: Answer, started: float) -> None:
        """Wait for ``lookup`` until it is ``lookup_wait_s`` old: answered by then, its
        request joins the step vLLM is scheduling instead of the one after (which, behind
        a long prefill, is a long time); a slow or hung store costs each new request this
        much once, then the request waits for later steps without holding any up."""
        left = started + self._settings.lookup_wait_s - time.monotonic()
        if left <= 0:
            return
        waited = time.monotonic()
        concurrent.futures.wait([lookup], timeout=left)
        self._stats.add("lookup_wait_seconds", time.monotonic() - waited)

    def _wants_lookup(self, request: Request, tracked: _Tracked, local_groups: int) -> bool:
        """Whether the store could add to the local prefix cache (breaker permitting)."""
        if not self._load or not tracked.usable or getattr(request, "skip_reading_prefix_cache", False):
            return False
        if self._limit(tracked) <= local_groups:
            return False
        if tracked.stored is None and tracked.lookup is None and not self._breaker.allows():
            self._stats.add("lookups_skipped")
            tracked.usable = False  # skips the store entirely, saves too
            tracked.done = len(tracked.prompt)
            return False
        return True

    def _limit(self, tracked: _Tracked) -> int:
        """Groups a hit may cover: vLLM computes at least the last prompt token."""
        return (len(tracked.prompt) - 1) // self._settings.split_factor

    def _track(self, request: Request) -> _Tracked:
        usable = cacheable(request)
        prompt = list(request.prompt_token_ids or ())
        split = self._settings.split_factor
        salt = request_salt(self._settings, request)
        if self._epoch is not None:
            salt = json.dumps([self._epoch, salt])
        digests: list[list[bytes]] = [[] for _ in self._probes]
        whole = len(prompt) // split * split
        if usable and whole:
            ids = torch.tensor(prompt[:whole], dtype=torch.int64)
            digests = [[g.digest for g in probe.config().chain(ids, salt)] for probe in self._probes]
        tracked = _Tracked(prompt=prompt, salt=salt, digests=digests, usable=usable)
        if not usable or not self._save:
            tracked.done = len(prompt)
        self._tracked[request.request_id] = tracked
        return tracked

    def _start(self, tracked: _Tracked, first_group: int, *, include_saving: bool) -> None:
        """Answer from what is trusted, and probe the groups past it (past those a live
        request here is saving too: they are likely in the local cache)."""
        limit = self._limit(tracked)
        keys = tracked.digests[0]
        start = first_group
        while start < limit:
            sizes = self._known.get(keys[start])
            if sizes is not None:
                tracked.sizes[start] = sizes
            elif not include_saving or self._saving.get(keys[start]) not in self._tracked:
                break  # not being computed by a request here now: likely not in the local cache
            start += 1
        tracked.lookup_from, tracked.counted = start, False
        split = self._settings.split_factor
        if start >= limit:
            tracked.stored = limit * split
            return
        tokens = torch.tensor(tracked.prompt[: limit * split], dtype=torch.int64)
        salt = tracked.salt

        def probe(first: int) -> Coroutine[Any, Any, list[list[int]]]:
            probes = (p.stored_sizes(tokens, salt=salt, first_group=first, heads=self._heads) for p in self._probes)
            return gather_or_cancel(*probes)

        tracked.lookup_started = time.monotonic()
        earlier = self._probing.get(keys[start])
        if earlier is not None and not earlier[0].done():  # these groups are being probed: join that
            answer, stop, theirs = earlier
            shared = start
            while shared < min(stop, limit) and theirs[shared] == keys[shared]:
                shared += 1
            rest = probe(shared) if shared < limit else None
            tracked.lookup = self._loop.submit(_joined(answer, shared - start, rest))
        else:
            tracked.lookup = self._loop.submit(probe(start))
        tracked.lookup.add_done_callback(lambda _: setattr(tracked, "lookup_answered", time.monotonic()))
        if earlier is None or earlier[0].done() or earlier[1] < limit:
            self._probing.put(keys[start], (tracked.lookup, limit, keys))
        self._stats.add("lookups")  # lookup_heads: the probes count the requests they send

    def _collect(self, tracked: _Tracked) -> None:
        future, tracked.lookup = tracked.lookup, None
        assert future is not None
        self._stats.add("lookup_seconds", max(0.0, tracked.lookup_answered - tracked.lookup_started))
        try:
            sizes = future.result()
        except Exception as exc:
            self._stats.add("lookup_failures")
            self._breaker.failed(f"lookup in {self._where}", f"{type(exc).__name__}: {exc}")
            sizes = []
            tracked.done = len(tracked.prompt)  # the store is failing: no saves either
        else:
            self._breaker.succeeded()
        found = min(map(len, sizes), default=0)  # every stage must hold a group for it to count
        start = tracked.lookup_from
        for i in range(found):  # a positive answer: trusted for a while (misses never are)
            group = start + i
            tracked.sizes[group] = tuple(stage[i] for stage in sizes)
            self._known.put(tracked.digests[0][group], tracked.sizes[group])
        tracked.stored = (start + found) * self._settings.split_factor

    def _loaded_elsewhere(self, req_id: str, tracked: _Tracked, local_groups: int) -> bool:
        """Whether another request is loading a group this one would load."""
        assert tracked.stored is not None
        keys = tracked.digests[0]
        end = tracked.stored // self._settings.split_factor
        return any(self._loading.get(keys[g], req_id) != req_id for g in range(local_groups, end))

    # ------------------------------------------------------------------ loads

    def allocated(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        """vLLM's ``update_state_after_alloc``: plan the load of the hit into its blocks."""
        tracked = self._tracked.get(request.request_id)
        if tracked is None or tracked.stored is None:
            return
        if not tracked.counted:  # once per answer, past the local prefix cache
            tracked.counted = True
            limit = self._limit(tracked) * self._settings.split_factor
            self._stats.add("hit_tokens", max(0, num_external_tokens))
            self._stats.add("miss_tokens", max(0, limit - max(tracked.stored, tracked.asked_at)))
        if num_external_tokens <= 0:
            return
        split = self._settings.split_factor
        end = tracked.stored
        start = end - num_external_tokens
        tracked.loading = (start, end)
        tracked.load_started = time.monotonic()
        tracked.block_ids = list(block_ids[: -(-end // self._block_size)])
        tracked.done = max(tracked.done, end)
        first, stop = start // split, end // split
        for group in range(first, stop):
            self._loading[tracked.digests[0][group]] = request.request_id
        self._loads.append(
            LoadSpec(
                req_id=request.request_id,
                tokens=tracked.prompt[first * split : end],
                start=start,
                end=end,
                block_ids=tracked.block_ids,
                spans=[_span(stage, first, stop) for stage in tracked.digests],
                held=[tuple(stage[:first]) for stage in tracked.digests],
                sizes=[[tracked.sizes[g][i] for g in range(first, stop)] for i in range(len(tracked.digests))],
            )
        )

    def loads_reported(self, finished: Iterable[str], invalid: set[int]) -> None:
        """Workers finished loads (some blocks maybe invalid): lower what counts as stored
        to the first bad block, so the groups vLLM recomputes are saved again (repairs),
        and stop trusting what failed to load."""
        split = self._settings.split_factor
        for tracked in self._tracked.values():
            if tracked.loading is None or not invalid:
                continue
            bad = next((i for i, b in enumerate(tracked.block_ids) if b in invalid), None)
            if bad is not None:
                valid = max(bad * self._block_size, tracked.loading[0])
                self._stats.add("load_failures", -(-(tracked.loading[1] - valid) // split))
                tracked.done = min(tracked.done, valid // split * split)
                tracked.repair_until = max(tracked.repair_until, tracked.loading[1])
                for group in range(valid // split, tracked.loading[1] // split):
                    self._known.discard(tracked.digests[0][group])
                tracked.loading = (tracked.loading[0], valid)
                tracked.stored = valid  # vLLM may ask again (nothing valid): offer no more than this
        for req_id in finished:
            done = self._tracked.get(req_id)
            if done is None or done.loading is None:
                continue
            start, end = done.loading
            done.loaded += end - start
            for group in range(start // split, end // split):  # loaded whole: found again
                self._known.put(done.digests[0][group], done.sizes[group])
            self._release_loads(req_id, done)
            done.loading = None
            # Counted here, once per engine: every worker loads (its heads) and vLLM sums them.
            self._stats.add("loaded_tokens", end - start)
            self._stats.add("load_seconds", time.monotonic() - done.load_started)

    def _release_loads(self, req_id: str, tracked: _Tracked) -> None:
        for key in tracked.digests[0] if tracked.digests else ():
            if self._loading.get(key) == req_id:
                del self._loading[key]

    # ------------------------------------------------------------------ saves

    def plan(self, scheduler_output: SchedulerOutput) -> Plan:
        """This step's loads, and saves of the prompt groups its forward pass completes."""
        if not scheduler_output.total_num_scheduled_tokens:
            self._idle()
        plan = Plan(loads=self._loads, preempted=sorted(scheduler_output.preempted_req_ids or ()))
        self._loads = []
        for req_id in plan.preempted:
            tracked = self._tracked.get(req_id)
            if tracked is not None:  # its blocks are gone (once the workers' copies end); looked up again when resumed
                tracked.stored, tracked.lookup, tracked.block_ids, tracked.saving = None, None, [], False
        if not self._save:
            return plan
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                self._plan_save(new.req_id, tracked, new.num_computed_tokens + scheduled.get(new.req_id, 0), plan)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                tracked.block_ids.extend(new_blocks[0])
            self._plan_save(req_id, tracked, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), plan)
        return plan

    def _idle(self) -> None:
        """A step with nothing to compute: vLLM would spin, asking again at once, and keep
        the GIL from the loop thread the answers need. Wait a moment for one instead (the
        engine has nothing else to do)."""
        lookups = [t.lookup for t in self._tracked.values() if t.lookup is not None]
        if any(lookup.done() for lookup in lookups):
            return  # the next step takes the answer
        if not self.await_lookup(_IDLE_WAIT) and (
            self._sending or any(t.loading is not None for t in self._tracked.values())
        ):
            time.sleep(_IDLE_WAIT)

    def await_lookup(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for one of the lookups still out to be answered;
        whether any was."""
        pending = [t.lookup for t in self._tracked.values() if t.lookup is not None and not t.lookup.done()]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return bool(pending)

    def _plan_save(self, req_id: str, tracked: _Tracked, computed: int, plan: Plan) -> None:
        """Save the groups completed since the last plan, but those known stored or being
        uploaded for another request (repairs replace bad objects: only the latter)."""
        split = self._settings.split_factor
        end = min(computed, len(tracked.prompt)) // split * split
        if end <= tracked.done or tracked.loading is not None:
            return
        first, stop = tracked.done // split, end // split
        repair = first * split < tracked.repair_until
        keys = tracked.digests[0]

        def taken(group: int) -> bool:
            owner = self._saving.get(keys[group])
            return (owner is not None and owner != req_id) or (not repair and keys[group] in self._known)

        group = first
        while group < stop:
            if taken(group):
                group += 1
                continue
            run = group
            while group < stop and not taken(group):
                self._saving.put(keys[group], req_id)
                group += 1
            per_group = split // self._block_size
            plan.saves.append(
                SaveSpec(
                    req_id=req_id,
                    tokens=tracked.prompt[run * split : group * split],
                    block_ids=tracked.block_ids[run * per_group : group * per_group],
                    spans=[_span(stage, run, group) for stage in tracked.digests],
                    repair=repair,
                )
            )
        tracked.done = end
        tracked.saving = True

    def uploaded(self, groups: Iterable[tuple[bytes, tuple[int, ...]]]) -> None:
        """Groups this engine stored, ``(stage-0 digest, object size per stage)``: trusted
        as a lookup's positive answer is, so the requests that follow neither probe them
        nor upload them again."""
        for key, sizes in groups:
            self._known.put(key, sizes)

    def holds(self, req_id: str) -> bool:
        """At vLLM's ``request_finished``: whether its blocks must stay until the workers
        report its copies done (``get_finished``'s sending). Not while a load runs: vLLM
        holds those blocks itself until the (cancelled) load is reported received."""
        tracked = self._tracked.get(req_id)
        if tracked is None or not tracked.saving or tracked.loading is not None:
            return False
        self._sending.add(req_id)
        return True

    def sent(self, req_ids: Iterable[str]) -> None:
        """The workers reported these finished requests' copies done; vLLM frees their blocks."""
        self._sending.difference_update(req_ids)

    def reset(self) -> None:
        """vLLM's ``reset_cache`` (after a weight update, say): nothing stored before is
        reused. A shared store cannot be emptied, so new requests use a new epoch in their
        salt (keys no one wrote before); requests already tracked stop looking up and saving."""
        self._epoch = uuid.uuid4().hex
        for tracked in self._tracked.values():
            if tracked.lookup is not None:
                tracked.lookup.cancel()
            tracked.lookup, tracked.usable = None, False
            tracked.done = len(tracked.prompt)
        self._probing.clear()
        for probe in self._probes:
            probe.forget_known()

    def finished(self, req_id: str) -> dict[str, Any] | None:
        """Forget a request; what it got from and gave to the store, for its output."""
        tracked = self._tracked.pop(req_id, None)
        self._loads = [spec for spec in self._loads if spec.req_id != req_id]
        if tracked is None:
            return None
        self._release_loads(req_id, tracked)
        return {"vua_s3": {"hit_tokens": tracked.loaded, "stored_or_queued_tokens": tracked.done}}


async def _joined(earlier: Answer, covered: int, rest: Coroutine[Any, Any, list[list[int]]] | None) -> list[list[int]]:
    """Another request's lookup, whose first ``covered`` groups are this one's too, with
    ``rest`` probing this one's groups past them meanwhile: one answer, as if probed alone.
    The earlier lookup is shielded: this one's cancellation leaves it running for its own."""
    tail = asyncio.ensure_future(rest) if rest is not None else None
    try:
        head = [stage[:covered] for stage in await asyncio.shield(asyncio.wrap_future(earlier))]
        if tail is None or min(map(len, head), default=0) < covered:  # a gap: nothing past it counts
            return head
        return [a + b for a, b in zip(head, await tail, strict=True)]
    finally:
        if tail is not None and not tail.done():
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)


def _span(digests: list[bytes], start: int, stop: int) -> Span:
    """Groups ``[start, stop)`` of one stage's chain."""
    return Span(start, tuple(digests[start:stop]), digests[start - 1] if start else None)
