"""Expiry by last use: loads re-stamp what they read (``refresh_after``), so gc and lifecycle
rules that go by last write remove what nobody read. On POSIX and real S3 servers over HTTP;
ages are made by setting file times (POSIX) or by waiting a second or two (S3, whose
last-modified times count whole seconds in its conditions)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache, unique_prefix

from vua_s3 import AsyncVUA, VUAConfig, open_store
from vua_s3.cli.main import main
from vua_s3.integrations.vllm.settings import ConnectorSettings
from vua_s3.ops.doctor import FAIL, PASS, WARN, Check, doctor
from vua_s3.ops.gc import gc
from vua_s3.presence import KnownPresent
from vua_s3.refresh import Refresher
from vua_s3.storage import Store
from vua_s3.storage.posix import PosixStore
from vua_s3.storage.s3.settings import SSE_C_KEY_ENV
from vua_s3.testing.faultproxy import Fault, FaultProxy
from vua_s3.testing.moto import EmbeddedS3
from vua_s3.testing.seaweed import SeaweedS3

SPLIT = 16
CFG = VUAConfig(split_factor=SPLIT)
PROMPTS = {name: torch.arange(start, start + 2 * SPLIT) for name, start in (("a", 0), ("b", 5000), ("c", 9000))}
KVS = {name: random_kvcache(seq_len=2 * SPLIT) for name in PROMPTS}  # 2 groups x 2 KV heads: 4 objects
KEYS = {name: CFG.tokens_to_paths(tokens, kv_heads=2) for name, tokens in PROMPTS.items()}
COPIES = Fault("status", method="PUT", header="x-amz-copy-source")


async def modified(store: Store) -> dict[str, float]:
    """Every object's last write, from a listing (S3: to the millisecond)."""
    return {info.key: info.last_modified async for info in store.list()}


async def age(location: str, store: Store, seconds: float) -> None:
    """Make every stored object older than ``seconds``: file times set back, or a wait."""
    if not location.startswith("s3://"):
        then = time.time() - seconds - 10
        for key in await modified(store):
            os.utime(Path(location) / key, (then, then))
        return
    newest = max((await modified(store)).values())
    await asyncio.sleep(max(0.0, newest + seconds + 1.1 - time.time()))


def refresher(vua: AsyncVUA) -> Refresher:
    assert vua.refresher is not None
    return vua.refresher


async def load(vua: AsyncVUA, name: str) -> bool:
    """Load a prompt; whether it was a whole, bit-exact hit."""
    hit = await vua.get_closest(PROMPTS[name])
    if hit is None:
        return False
    assert hit.tokens.numel() == 2 * SPLIT
    assert_kv_equal(hit.data, KVS[name])
    return True


def test_loads_refresh_what_they_read_and_gc_removes_the_unread(location: str) -> None:
    async def run() -> None:
        async with AsyncVUA(CFG, location, refresh_after=1) as vua:
            for name, tokens in PROMPTS.items():
                assert await vua.put(tokens, KVS[name]) == 2
            await age(location, vua.store, 1)
            before = await modified(vua.store)
            vua.forget_known()  # what a new reader knows: nothing
            assert await load(vua, "a")
            await refresher(vua).settle()
            after = await modified(vua.store)
            assert all(after[key] > before[key] for key in KEYS["a"])
            assert all(after[key] == before[key] for key in KEYS["b"] + KEYS["c"])
            r = refresher(vua)
            assert (r.sent, r.refreshed, r.skipped, r.failed, r.dropped) == (4, 4, 0, 0, 0)

            # Read again within refresh_after (raised to an hour, so however slow this machine
            # is), fresh or forgotten: no new request.
            r.after = 3600
            assert await load(vua, "a")
            vua.forget_known()
            assert await load(vua, "a")
            await r.settle()
            assert r.sent == 4
            assert await modified(vua.store) == after

            # gc --max-bytes: least recently used first. One prompt's worth over the cap goes,
            # from the unread ones (b and c are the same age: ties go by key).
            sizes = {info.key: info.size async for info in vua.store.list()}
            total, one = sum(sizes.values()), sum(sizes[key] for key in KEYS["b"])
            capped = await gc(location, max_bytes=total - one)
            assert capped.deleted == 4
            left = set(await modified(vua.store))
            assert set(KEYS["a"]) <= left and len(left) == 8

            # gc --older-than: exactly the unread groups left go.
            newest_unread = max(after[key] for key in KEYS["b"] + KEYS["c"])
            oldest_read = min(after[key] for key in KEYS["a"])
            assert newest_unread < oldest_read - 0.5
            expired = await gc(location, older_than=1.0, now=oldest_read + 0.5)
            assert expired.deleted == 4
            assert set(await modified(vua.store)) == set(KEYS["a"])
            vua.forget_known()
            assert await load(vua, "a")
            assert not await load(vua, "b") and not await load(vua, "c")

    asyncio.run(run())


def test_a_refresh_elsewhere_is_not_repeated(location: str, request: pytest.FixtureRequest) -> None:
    """Two readers (two processes, as a vLLM scheduler and worker are): the second loads
    groups by their sizes, without a probe, so it cannot know their age and asks; the store
    declines the copy (moto ignores the condition and copies)."""

    async def run() -> None:
        async with (
            AsyncVUA(CFG, location, refresh_after=1) as first,
            AsyncVUA(CFG, location, refresh_after=60) as second,
        ):
            await first.put(PROMPTS["a"], KVS["a"])
            await age(location, first.store, 1)
            first.forget_known()
            assert await load(first, "a")
            await refresher(first).settle()
            assert refresher(first).refreshed == 4
            sizes = await first.stored_sizes(PROMPTS["a"])
            placed: list[int] = []
            used = await second.load_groups(PROMPTS["a"], 0, lambda n, kv: placed.append(n) is None, sizes=sizes)
            assert used == 2 and sorted(placed) == [0, 1]
            await refresher(second).settle()
            r = refresher(second)
            copied = request.node.callspec.params["location"] == "moto"
            assert (r.sent, r.refreshed, r.skipped) == (4, 4 if copied else 0, 0 if copied else 4)

    asyncio.run(run())


def test_a_chain_start_the_caller_holds_is_refreshed_too(posix_or_moto: str) -> None:
    """vLLM loads from the first group its own prefix cache lacks: the groups before it were
    used too, and must not expire before the ones after them."""

    async def run() -> None:
        async with AsyncVUA(CFG, posix_or_moto, refresh_after=1) as vua:
            await vua.put(PROMPTS["a"], KVS["a"])
            await age(posix_or_moto, vua.store, 1)
            before = await modified(vua.store)
            vua.forget_known()
            sizes = await vua.stored_sizes(PROMPTS["a"], first_group=1)
            assert await vua.load_groups(PROMPTS["a"], 1, lambda n, kv: True, sizes=sizes) == 1
            await refresher(vua).settle()
            assert refresher(vua).refreshed == 4
            after = await modified(vua.store)
            assert all(after[key] > before[key] for key in KEYS["a"])

    asyncio.run(run())


def test_the_verb_declines_what_is_newer_or_gone(location: str, request: pytest.FixtureRequest) -> None:
    """``Store.refresh`` re-stamps an object last written before the bound, keeps its bytes,
    and declines one written after it (except moto, which ignores copy conditions: its
    answer is a copy) or one that is gone."""

    async def run() -> None:
        store = open_store(location)
        try:
            await store.put("ns/x", b"payload" * 100)
            await age(location, store, 1)
            written = (await modified(store))["ns/x"]
            ignores_conditions = request.node.callspec.params["location"] == "moto"
            assert await store.refresh("ns/x", written - 10) is ignores_conditions
            assert await store.refresh("ns/x", time.time()) is True
            assert (await modified(store))["ns/x"] > written
            assert await store.get("ns/x") == b"payload" * 100
            assert await store.refresh("ns/missing", time.time()) is False
            assert "ns/missing" not in await modified(store)
        finally:
            await store.close()

    asyncio.run(run())


def test_failing_refreshes_never_fail_or_hold_up_loads(moto_server: EmbeddedS3, caplog) -> None:  # type: ignore[no-untyped-def]
    """A copy answered 503 is a counted failure, logged once, and the load it came from
    returns the same data with the same requests; copies held at the proxy hold up no load."""

    async def run(proxy: FaultProxy) -> None:
        url = moto_server.url(unique_prefix()).replace(moto_server.endpoint_url, proxy.endpoint_url)
        async with AsyncVUA(CFG, url + "&max_attempts=2", refresh_after=1) as vua:
            for name, tokens in PROMPTS.items():
                await vua.put(tokens, KVS[name])
            r = refresher(vua)
            await age(url, vua.store, 1)
            proxy.faults = [COPIES]
            vua.forget_known()
            proxy.requests.clear()
            assert await load(vua, "a")
            gets = [q for q in proxy.requests if q.method == "GET"]
            await r.settle()
            assert (r.sent, r.failed, r.refreshed) == (4, 4, 0)
            assert COPIES.hits == 8  # each copy tried twice (max_attempts)
            assert len(gets) == 6  # as any load: a LIST per group, a GET per object
            r.after = 3600
            assert await load(vua, "a")  # failed within refresh_after: not asked again
            await r.settle()
            assert r.sent == 4
            r.after = 1

            # Copies held at the proxy: the loads that sent them, and others, finish meanwhile.
            held = Fault("hold", method="PUT", header="x-amz-copy-source")
            proxy.faults = [held]
            assert await load(vua, "b")
            assert await asyncio.to_thread(proxy.held.wait, 30)
            assert await load(vua, "c")
            assert r.refreshed == 0
            proxy.release()
            await r.settle()
            assert (r.sent, r.refreshed, r.failed) == (12, 8, 4)

    caplog.set_level(logging.WARNING, logger="vua_s3")
    with FaultProxy(moto_server.port) as proxy:
        asyncio.run(run(proxy))
    warnings = [rec.getMessage() for rec in caplog.records if "refreshing objects" in rec.getMessage()]
    assert len(warnings) == 1 and "SlowDown" in warnings[0]


def test_loads_without_refresh_after_copy_nothing(posix_or_moto: str) -> None:
    async def run() -> None:
        async with AsyncVUA(CFG, posix_or_moto) as vua:
            await vua.put(PROMPTS["a"], KVS["a"])
            await age(posix_or_moto, vua.store, 0)
            before = await modified(vua.store)
            vua.forget_known()
            assert await load(vua, "a")
            assert vua.refresher is None
            assert await modified(vua.store) == before

    asyncio.run(run())


@pytest.mark.parametrize("sse", ["sse-s3", "sse-c"])
def test_copies_carry_the_stores_encryption(moto_server: EmbeddedS3, monkeypatch, sse: str) -> None:  # type: ignore[no-untyped-def]
    """A replaced copy would take the bucket's default encryption: the store's is sent again
    (SSE-C: the key for the source and for the copy)."""
    monkeypatch.setenv(SSE_C_KEY_ENV, base64.b64encode(bytes(range(32))).decode())

    async def run(proxy: FaultProxy) -> None:
        url = moto_server.url(unique_prefix()).replace(moto_server.endpoint_url, proxy.endpoint_url)
        async with AsyncVUA(CFG, f"{url}&sse={sse}", refresh_after=1) as vua:
            await vua.put(PROMPTS["a"], KVS["a"])
            await age(url, vua.store, 1)
            vua.forget_known()
            assert await load(vua, "a")
            await refresher(vua).settle()
            assert refresher(vua).refreshed == 4

    with FaultProxy(moto_server.port) as proxy:
        asyncio.run(run(proxy))
    copies = [q for q in proxy.requests if "x-amz-copy-source" in q.headers]
    assert len(copies) == 4
    wanted = (
        {"x-amz-server-side-encryption": "AES256"}
        if sse == "sse-s3"
        else {
            "x-amz-server-side-encryption-customer-algorithm": "AES256",
            "x-amz-copy-source-server-side-encryption-customer-algorithm": "AES256",
        }
    )
    for copy in copies:
        assert {name: copy.headers.get(name) for name in wanted} == wanted
        assert copy.headers["x-amz-metadata-directive"] == "REPLACE"
        assert "x-amz-copy-source-if-unmodified-since" in copy.headers
        if sse == "sse-c":
            assert copy.headers["x-amz-copy-source-server-side-encryption-customer-key"]


def test_refresh_after_is_checked() -> None:
    with pytest.raises(ValueError, match="refresh_after"):
        AsyncVUA(CFG, "/tmp/unused-vua-refresh", refresh_after=0)
    settings = ConnectorSettings.from_extra_config({"url": "s3://b/p", "refresh_after": 86400})
    assert settings.refresh_after == 86400
    assert ConnectorSettings.from_extra_config({"url": "s3://b/p"}).refresh_after is None
    with pytest.raises(ValueError, match="refresh_after"):
        ConnectorSettings.from_extra_config({"url": "s3://b/p", "refresh_after": -1})


def rows(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_doctor_checks_the_refresh(moto_server: EmbeddedS3, seaweed_server: SeaweedS3, tmp_path: Path) -> None:
    seaweed = rows(doctor(seaweed_server.url(unique_prefix())))["refresh"]
    assert seaweed.status == PASS and "declined" in seaweed.detail
    moto = rows(doctor(moto_server.url(unique_prefix())))["refresh"]
    assert moto.status == WARN and "copy conditions ignored" in moto.detail
    posix = rows(doctor(str(tmp_path)))["refresh"]
    assert posix.status == PASS and "mode, owner kept" in posix.detail
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("status", "code", "fix"),
    [(403, "AccessDenied", "grant s3:GetObject and s3:PutObject"), (501, "NotImplemented", "leave refresh_after off")],
)
def test_doctor_names_the_fix_when_copies_fail(moto_server: EmbeddedS3, status: int, code: str, fix: str) -> None:
    with FaultProxy(moto_server.port) as proxy:
        proxy.faults = [Fault("status", method="PUT", header="x-amz-copy-source", status=status, code=code)]
        url = moto_server.url(unique_prefix()).replace(moto_server.endpoint_url, proxy.endpoint_url)
        checks = doctor(url + "&max_attempts=1")
    refresh = rows(checks)["refresh"]
    assert refresh.status == WARN and fix in refresh.fix
    assert all(check.status != FAIL for check in checks)  # a cache works without it


def test_bench_refresh_rows(capsys) -> None:  # type: ignore[no-untyped-def]
    """``vua-s3 bench --refresh``: both loads measured, one copy per object of each hit group."""
    argv = ["bench", "--server", "moto", "--model", "tiny", "--tokens", "64", "--split-factor", "16"]
    assert main([*argv, "--repeats", "2", "--refresh", "--no-posix", "--no-cold", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    refresh = report["refresh"]
    assert refresh["copies_per_group"] == [2, 2]  # the tiny shape's 2 KV heads
    assert refresh["get_due"]["requests"].get("list_objects_v2") == 4  # the load's own probes, as with refresh off
    assert refresh["get_off"]["requests"] == {"list_objects_v2": 4, "get_object": 8}
    assert len(refresh["get_due"]["seconds"]["samples"]) == 2 and "median" in refresh["cpu_ms_per_group"]
    assert report["ratios"]["get_refresh_due_vs_off"] > 0


class _HeldStore(PosixStore):
    """Refreshes wait for the test to release them; how many are out at once is counted."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = asyncio.Event()
        self.out = self.most = 0

    async def refresh(self, key: str, written_before: float) -> bool:
        self.out += 1
        self.most = max(self.most, self.out)
        try:
            await self.release.wait()
            return await super().refresh(key, written_before)
        finally:
            self.out -= 1


def test_refreshes_wait_while_a_verb_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """None starts while the cache object is busy; after PATIENCE of busy, one at a time."""

    async def run() -> None:
        store = _HeldStore(tmp_path)
        keys = [f"ns/{i}" for i in range(6)]
        for key in keys:
            await store.put(key, b"x")
        await age(str(tmp_path), store, 1)
        refresher = Refresher(store, 1, KnownPresent(), concurrency=4)
        with refresher.busy():
            refresher.used(keys[:3])  # ages unknown: all due
            await asyncio.sleep(0.05)
            assert refresher.sent == 0
        await asyncio.sleep(0)
        assert refresher.sent == 3
        store.release.set()
        await refresher.settle()
        assert refresher.refreshed == 3
        store.release.clear()
        monkeypatch.setattr("vua_s3.refresh.PATIENCE", 0.0)
        with refresher.busy():
            refresher.used(keys[3:])
            await asyncio.sleep(0.05)
            assert refresher.sent == 4 and store.most == 3  # one, as the rest wait for the pause
            store.release.set()
            await asyncio.sleep(0.05)
        await refresher.settle()
        assert refresher.refreshed == 6

    asyncio.run(run())
