"""The connector's scheduler side: lookups in the background, loads and saves planned.

Nothing here waits on the store. A lookup is submitted to the connector's loop and
:meth:`SchedulerSide.matched` answers ``None`` (vLLM asks again next step) until it is
back; hits are loaded asynchronously (vLLM parks the request until the workers report
it). After a store failure the breaker sends new requests straight to prefill.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...loop import BackgroundLoop, gather_or_cancel
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


@dataclass
class _Tracked:
    """Scheduler-side state of one request."""

    prompt: list[int]
    salt: str | None
    usable: bool
    done: int = 0
    """Leading prompt tokens known stored or already handed to a worker to save."""
    lookup: concurrent.futures.Future[list[list[int]]] | None = None
    lookup_from: int = 0
    """First group the lookup probed (the ones before are in the local prefix cache)."""
    lookup_started: float = 0.0
    stored: int | None = None
    """Leading prompt tokens the store holds, once the lookup answered."""
    sizes: list[list[int]] = field(default_factory=list)
    """Per pipeline stage, the object sizes of the stored groups from ``lookup_from`` on
    (every KV head of a group has the same size, so they serve every TP rank)."""
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
    """Lookups, load plans and save plans for the requests of one engine."""

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
        self._tracked: dict[str, _Tracked] = {}
        self._loads: list[LoadSpec] = []
        self._sending: set[str] = set()
        """Finished requests whose blocks vLLM holds until the workers' copies are done."""
        self._epoch: str | None = None
        """Set by :meth:`reset`: mixed into every new request's salt."""

    # ------------------------------------------------------------------ lookups

    def matched(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """vLLM's ``get_num_new_matched_tokens``: ``(None, False)`` while the lookup runs,
        then ``(n, True)`` for a hit of ``n`` tokens past the local prefix cache."""
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            tracked = self._track(request)
        split = self._settings.split_factor
        local_groups = num_computed_tokens // split
        tracked.done = max(tracked.done, local_groups * split)
        if not self._load or not tracked.usable or getattr(request, "skip_reading_prefix_cache", False):
            return 0, False
        limit = (len(tracked.prompt) - 1) // split * split  # vLLM computes at least one token
        if limit <= local_groups * split:
            return 0, False
        if tracked.stored is None and tracked.lookup is None:
            if not self._breaker.allows():
                self._stats.add("lookups_skipped")
                tracked.usable = False  # skips the store entirely, saves too
                tracked.done = len(tracked.prompt)
                return 0, False
            self._submit(tracked, local_groups, limit)
        if tracked.lookup is not None:
            if not tracked.lookup.done():
                return None, False
            self._collect(tracked, limit)
        assert tracked.stored is not None
        if tracked.lookup_from > local_groups:  # the local cache lost blocks meanwhile: ask again
            tracked.stored = None
            return self.matched(request, num_computed_tokens)
        return (tracked.stored - num_computed_tokens, True) if tracked.stored > num_computed_tokens else (0, False)

    def _track(self, request: Request) -> _Tracked:
        usable = cacheable(request)
        prompt = list(request.prompt_token_ids or ())
        salt = request_salt(self._settings, request)
        if self._epoch is not None:
            salt = json.dumps([self._epoch, salt])
        tracked = _Tracked(prompt=prompt, salt=salt, usable=usable)
        if not usable or not self._save:
            tracked.done = len(prompt)
        self._tracked[request.request_id] = tracked
        return tracked

    def _submit(self, tracked: _Tracked, first_group: int, limit: int) -> None:
        tokens = torch.tensor(tracked.prompt[:limit], dtype=torch.int64)
        probes = (
            p.stored_sizes(tokens, salt=tracked.salt, first_group=first_group, heads=self._heads) for p in self._probes
        )
        tracked.lookup_from = first_group
        tracked.lookup_started = time.monotonic()
        tracked.lookup = self._loop.submit(gather_or_cancel(*probes))
        self._stats.add("lookups")  # lookup_heads: the probes count the requests they send

    def _collect(self, tracked: _Tracked, limit: int) -> None:
        future, tracked.lookup = tracked.lookup, None
        assert future is not None
        self._stats.add("lookup_seconds", time.monotonic() - tracked.lookup_started)
        split = self._settings.split_factor
        start = tracked.lookup_from * split
        try:
            sizes = future.result()
        except Exception as exc:
            self._stats.add("lookup_failures")
            self._breaker.failed(f"lookup in {self._where}", f"{type(exc).__name__}: {exc}")
            sizes = []
            tracked.done = len(tracked.prompt)  # the store is failing: no saves either
        else:
            self._breaker.succeeded()
        groups = min(map(len, sizes), default=0)  # every stage must hold a group for it to count
        tracked.sizes = [stage[:groups] for stage in sizes]
        tracked.stored = start + groups * split
        self._stats.add("hit_tokens", tracked.stored - start)
        self._stats.add("miss_tokens", limit - tracked.stored)

    # ------------------------------------------------------------------ loads

    def allocated(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        """vLLM's ``update_state_after_alloc``: plan the load of the hit into its blocks."""
        if num_external_tokens <= 0:
            return
        tracked = self._tracked[request.request_id]
        assert tracked.stored is not None
        end = tracked.stored
        start = end - num_external_tokens
        tracked.loading = (start, end)
        tracked.load_started = time.monotonic()
        tracked.block_ids = list(block_ids[: -(-end // self._block_size)])
        tracked.done = max(tracked.done, end)
        skip = start // self._settings.split_factor - tracked.lookup_from
        self._loads.append(
            LoadSpec(
                req_id=request.request_id,
                tokens=tracked.prompt[:end],
                start=start,
                block_ids=tracked.block_ids,
                salt=tracked.salt,
                sizes=[stage[skip:] for stage in tracked.sizes],
            )
        )

    def loads_reported(self, finished: Iterable[str], invalid: set[int]) -> None:
        """Workers finished loads (some blocks maybe invalid): lower what counts as stored
        to the first bad block, so the groups vLLM recomputes are saved again (repairs)."""
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
                tracked.loading = (tracked.loading[0], valid)
                tracked.stored = valid  # vLLM may ask again (nothing valid): offer no more than this
        for req_id in finished:
            done = self._tracked.get(req_id)
            if done is None or done.loading is None:
                continue
            start, end = done.loading
            done.loaded += end - start
            done.loading = None
            # Counted here, once per engine: every worker loads (its heads) and vLLM sums them.
            self._stats.add("loaded_tokens", end - start)
            self._stats.add("load_seconds", time.monotonic() - done.load_started)

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
        if lookups:
            concurrent.futures.wait(lookups, timeout=_IDLE_WAIT, return_when=concurrent.futures.FIRST_COMPLETED)
        elif self._sending or any(t.loading is not None for t in self._tracked.values()):
            time.sleep(_IDLE_WAIT)

    def _plan_save(self, req_id: str, tracked: _Tracked, computed: int, plan: Plan) -> None:
        split = self._settings.split_factor
        end = min(computed, len(tracked.prompt)) // split * split
        if end <= tracked.done or tracked.loading is not None:
            return
        first = tracked.done // split
        per_group = split // self._block_size
        plan.saves.append(
            SaveSpec(
                req_id=req_id,
                tokens=tracked.prompt[:end],
                first_group=first,
                block_ids=tracked.block_ids[first * per_group : end // self._block_size],
                salt=tracked.salt,
                repair=first * split < tracked.repair_until,
            )
        )
        tracked.done = end
        tracked.saving = True

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
        for probe in self._probes:
            probe.forget_known()

    def finished(self, req_id: str) -> dict[str, Any] | None:
        """Forget a request; what it got from and gave to the store, for its output."""
        tracked = self._tracked.pop(req_id, None)
        self._loads = [spec for spec in self._loads if spec.req_id != req_id]
        if tracked is None:
            return None
        return {"vua_s3": {"hit_tokens": tracked.loaded, "stored_or_queued_tokens": tracked.done}}
