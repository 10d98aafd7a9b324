"""Ops commands against real stores: ``vua-s3 doctor``, ``gc`` and ``stats``."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from conftest import random_kvcache, unique_prefix
from test_bad_input import listing

from vua_s3 import VUA, VUAConfig, open_store
from vua_s3.cli.main import main
from vua_s3.ops.doctor import FAIL, PASS, WARN, Check, doctor
from vua_s3.ops.gc import gc
from vua_s3.storage import ObjectInfo, Store
from vua_s3.storage.posix import PosixStore
from vua_s3.testing.faultproxy import Fault, FaultProxy
from vua_s3.testing.moto import EmbeddedS3, free_port
from vua_s3.units import parse_age

CFG = VUAConfig(split_factor=16, namespace="model-a")
OTHER = VUAConfig(split_factor=16, namespace="model-b")
TOKENS = torch.arange(64)


def rows(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.status for c in checks}


@pytest.fixture
def proxy(moto_server: EmbeddedS3) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.port) as px:
        yield px


# --- doctor ----------------------------------------------------------------------------------


def test_doctor_passes_against_moto_and_cleans_up(moto_server, capsys) -> None:  # type: ignore[no-untyped-def]
    prefix = unique_prefix()
    assert main(["doctor", moto_server.url(prefix)]) == 0
    out = capsys.readouterr().out
    print(out)
    for name in (
        "credentials",
        "bucket",
        "put",
        "head",
        "get",
        "ranged get",
        "multipart",
        "checksums",
        "delete",
        "fragments",
    ):
        assert any(line.startswith(name + " ") and f"  {PASS} " in line for line in out.splitlines()), name
    assert "conditional put" in out
    assert asyncio.run(listing(moto_server.url(prefix))) == {}  # scratch objects removed
    uploads = moto_server.client().list_multipart_uploads(Bucket=moto_server.bucket, Prefix=prefix)
    assert not uploads.get("Uploads")


def _checksum_refusing_proxy(proxy: FaultProxy) -> None:
    """An endpoint that refuses boto3's default CRC32 checksum headers, as some S3 systems do."""
    proxy.faults = [
        Fault("status", status=400, code="InvalidArgument", header=header)
        for header in ("x-amz-checksum-crc32", "x-amz-trailer", "x-amz-sdk-checksum-algorithm")
    ]


def test_doctor_names_the_checksum_fix(moto_server, proxy, capsys) -> None:  # type: ignore[no-untyped-def]
    _checksum_refusing_proxy(proxy)
    base = f"s3://{moto_server.bucket}/{unique_prefix()}?endpoint_url={proxy.endpoint_url}&region=us-east-1"
    url = base + "&addressing=path&max_attempts=1"
    assert main(["doctor", url + "&checksum=when_supported"]) == 1
    out = capsys.readouterr().out
    assert "fix checksums: this endpoint rejects CRC32 checksums: add checksum=when_required" in out
    assert proxy.served("status") >= 1
    checks = doctor(url)  # the default, when_required, works there: a warning, not a failure
    assert rows(checks)["checksums"] == WARN
    assert all(c.status in (PASS, WARN) for c in checks), checks


def test_doctor_says_whether_the_endpoint_checks_upload_checksums(moto_server, seaweed_server, proxy) -> None:  # type: ignore[no-untyped-def]
    checked = {c.name: c for c in doctor(seaweed_server.url(unique_prefix()))}["upload checksum"]
    assert (checked.status, "accepted and checked" in checked.detail) == (PASS, True)
    assert "payload_signing=off" in checked.detail  # plain HTTP, signed: what the checksum allows
    ignored = {c.name: c for c in doctor(moto_server.url(unique_prefix()))}["upload checksum"]
    assert (ignored.status, "not checked" in ignored.detail) == (WARN, True)
    assert "keep payload_signing=auto" in ignored.fix
    proxy.faults = [Fault("status", status=400, code="InvalidArgument", header="x-amz-checksum-crc32c")]
    url = f"s3://{moto_server.bucket}/{unique_prefix()}?endpoint_url={proxy.endpoint_url}&region=us-east-1"
    checks = doctor(url + "&addressing=path&max_attempts=1")
    refused = {c.name: c for c in checks}["upload checksum"]
    assert (refused.status, refused.fix.startswith("set upload_checksum=off")) == (WARN, True)
    assert rows(checks)["fragments"] == PASS  # the default (auto) stores fragments there anyway


def test_doctor_reports_missing_bucket_and_dead_endpoint(moto_server, capsys) -> None:  # type: ignore[no-untyped-def]
    missing = moto_server.url("p").replace(f"s3://{moto_server.bucket}/", "s3://no-such-bucket/")
    assert main(["doctor", missing]) == 1
    assert "fix bucket: create bucket 'no-such-bucket' or correct its name" in capsys.readouterr().out
    dead = f"s3://b/p?endpoint_url=http://127.0.0.1:{free_port()}&region=us-east-1&max_attempts=1&connect_timeout=1"
    checks = doctor(dead)
    assert rows(checks)["bucket"] == FAIL
    assert "check endpoint_url" in next(c.fix for c in checks if c.name == "bucket")
    assert rows(checks)["put"] == "skip"


def test_doctor_without_credentials(moto_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    checks = doctor(moto_server.url("p"))
    credentials = next(c for c in checks if c.name == "credentials")
    assert credentials.status == FAIL and "AWS_ACCESS_KEY_ID" in credentials.fix


def test_doctor_refused_access_names_the_permission(moto_server, proxy) -> None:  # type: ignore[no-untyped-def]
    proxy.faults = [Fault("status", method="DELETE", status=403, code="AccessDenied")]
    url = f"s3://{moto_server.bucket}/p?endpoint_url={proxy.endpoint_url}&region=us-east-1&addressing=path"
    checks = doctor(url)
    delete = next(c for c in checks if c.name == "delete")
    assert delete.status == FAIL and "s3:DeleteObject" in delete.fix


def test_doctor_names_list_bucket_when_lookups_cannot_list(moto_server, proxy) -> None:  # type: ignore[no-untyped-def]
    proxy.faults = [Fault("status", method="GET", query_contains="list-type=2", status=403, code="AccessDenied")]
    url = f"s3://{moto_server.bucket}/p?endpoint_url={proxy.endpoint_url}&region=us-east-1&addressing=path"
    checks = doctor(url)
    assert all(c.status != FAIL for c in checks if c.name in ("put", "get", "delete"))
    fragments = next(c for c in checks if c.name == "fragments")
    assert fragments.status == FAIL and "s3:ListBucket" in fragments.fix


def test_doctor_on_posix(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["doctor", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mode 640" in out
    assert "format 2: 2 objects (one per KV head), lookup and round trip" in out
    assert list(tmp_path.iterdir()) == []


def test_doctor_bad_url() -> None:
    checks = doctor("s3://bucket/p?colour=blue")
    assert checks[0].status == FAIL and "unknown S3 setting 'colour'" in checks[0].detail


# --- gc --------------------------------------------------------------------------------------


def _fill(location: str) -> None:
    with VUA(CFG, location) as a, VUA(OTHER, location) as b:
        a.put(TOKENS, random_kvcache(seq_len=64))
        b.put(TOKENS, random_kvcache(seq_len=64))

    async def foreign() -> None:
        store = open_store(location)
        await store.put("README.txt", b"not a fragment")
        await store.put("model-a/notes/keep.txt", b"not a fragment either")
        await store.close()

    asyncio.run(foreign())


def test_gc_deletes_only_old_fragments(location: str) -> None:
    _fill(location)
    before = asyncio.run(listing(location))
    fresh = asyncio.run(gc(location, older_than=3600))
    assert (fresh.scanned, fresh.expired, fresh.deleted) == (18, 0, 0)  # 2 x 4 groups x 2 KV heads, 2 others
    assert asyncio.run(listing(location)) == before

    dry = asyncio.run(gc(location, older_than=3600, now=time.time() + 7200, dry_run=True))
    assert (dry.deleted, dry.skipped_foreign, dry.dry_run) == (16, 2, True)
    assert asyncio.run(listing(location)) == before

    report = asyncio.run(gc(location, older_than=3600, namespace="model-a", now=time.time() + 7200))
    assert (report.scanned, report.deleted, report.skipped_foreign) == (9, 8, 1)
    assert report.bytes_freed == sum(size for key, size in before.items() if key.endswith(".safetensors")) // 2
    after = asyncio.run(listing(location))
    assert sorted(after) == sorted(k for k in before if not k.startswith("model-a/") or k.endswith(".txt"))
    with VUA(CFG, location) as a, VUA(OTHER, location) as b:
        assert a.get_closest(TOKENS) is None
        assert b.lookup(TOKENS) == 64
        assert a.put(TOKENS, random_kvcache(seq_len=64)) == 4  # the cache simply fills again


def test_gc_keeps_a_fragment_rewritten_while_it_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Another client rewrites a fragment between gc's listing and its delete: it stays."""
    _fill(str(tmp_path))
    old = time.time() - 3 * 86400
    for path in tmp_path.rglob("*.safetensors"):
        os.utime(path, (old, old))
    rewritten = CFG.tokens_to_paths(TOKENS)[0]

    class RacingStore(PosixStore):
        async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
            if rewritten in keys:
                await self.put(rewritten, await self.get(rewritten))  # a writer's fresh copy
            return await super().head_many(keys)

    store: Store = RacingStore(tmp_path)
    report = asyncio.run(gc(store, older_than=86400))
    assert (report.expired, report.deleted) == (16, 15)
    assert (tmp_path / rewritten).exists()


def test_gc_cli_summary_and_flags(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    _fill(str(tmp_path))
    assert main(["gc", str(tmp_path), "--older-than", "7d", "--dry-run"]) == 0
    assert "would delete 0 of 18 objects" in capsys.readouterr().out
    assert main(["gc", str(tmp_path), "--older-than", "0s", "--namespace", "model-b"]) == 0
    out = capsys.readouterr().out
    assert "deleted 8 of 8 objects" in out and "removed 0 stale incomplete writes" in out
    assert main(["gc", str(tmp_path), "--max-bytes", "6KiB", "--per-namespace"]) == 0
    out = capsys.readouterr().out
    assert "deleted 5 of 10 objects" in out and "5 of them over the byte cap" in out, out
    bad_flags = (
        ["--older-than", "7 days"],
        ["--older-than", "-1d"],
        ["--older-than", "1d", "--namespace", "a/b"],
        ["--max-bytes", "lots"],
        ["--max-bytes", "-1"],
        ["--older-than", "1d", "--per-namespace"],
        [],
    )
    for bad in bad_flags:
        with pytest.raises(SystemExit) as exit_info:
            main(["gc", str(tmp_path), *bad])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--older-than" in err and "--max-bytes" in err and "needs --max-bytes" in err


def _age_files(root: Path, ages: dict[str, float]) -> None:
    """Give each fragment of each prompt (by token offset) its own age in seconds."""
    now = time.time()
    for key, seconds in ages.items():
        os.utime(root / key, (now - seconds, now - seconds))


def test_gc_max_bytes_deletes_least_recently_written_first(tmp_path: Path) -> None:
    prompts = [torch.arange(64) + 1000 * i for i in range(3)]  # oldest first
    with VUA(CFG, tmp_path) as a, VUA(OTHER, tmp_path) as b:
        for vua in (a, b):
            for prompt in prompts:
                vua.put(prompt, random_kvcache(seq_len=64, heads=1))  # one object per group
    ages = {}
    for i, prompt in enumerate(prompts):
        for j, cfg in enumerate((CFG, OTHER)):
            for g, key in enumerate(cfg.tokens_to_paths(prompt)):
                ages[key] = 3600.0 * (3 - i) + 60 * j + g  # within a prompt, later groups are older
    _age_files(tmp_path, ages)
    sizes = {key: (tmp_path / key).stat().st_size for key in ages}
    by_age = sorted(ages, key=ages.__getitem__, reverse=True)  # oldest first
    total, oldest4 = sum(sizes.values()), sum(sizes[k] for k in by_age[:4])

    dry = asyncio.run(gc(str(tmp_path), max_bytes=total - oldest4, dry_run=True))
    assert (dry.over_cap, dry.deleted, dry.bytes_kept) == (4, 4, total - oldest4)
    assert all((tmp_path / key).exists() for key in ages)

    report = asyncio.run(gc(str(tmp_path), max_bytes=total - oldest4 + 1))
    assert (report.scanned, report.over_cap, report.deleted, report.bytes_freed) == (24, 4, 4, oldest4)
    assert sorted(k for k in ages if not (tmp_path / k).exists()) == sorted(by_age[:4])

    for cfg in (CFG, OTHER):
        mine = [k for k in by_age if k.startswith(cfg.namespace + "/") and (tmp_path / k).exists()]
        assert sum(sizes[k] for k in mine[-6:]) <= 6 * max(sizes.values())
    per = asyncio.run(gc(str(tmp_path), max_bytes=6 * max(sizes.values()), per_namespace=True))
    left = {k for k in ages if (tmp_path / k).exists()}
    assert per.bytes_kept == sum(sizes[k] for k in left)
    for cfg in (CFG, OTHER):
        mine = [k for k in by_age if k.startswith(cfg.namespace + "/")]
        assert left & set(mine) == set(mine[-6:])  # each namespace keeps its 6 newest

    with VUA(CFG, tmp_path) as a:
        assert a.lookup(prompts[2]) == 64  # the newest prompt is whole
        assert a.lookup(prompts[1]) == 32  # its groups 0 and 1 were written last
        assert a.get_closest(prompts[0]) is None


def test_gc_max_bytes_on_s3(location: str) -> None:
    _fill(location)
    before = asyncio.run(listing(location))
    fragments = {k: v for k, v in before.items() if k.endswith(".safetensors")}
    cap = sum(fragments.values()) // 2
    report = asyncio.run(gc(location, max_bytes=cap))
    assert report.deleted == 8 and report.bytes_kept <= cap  # 4 groups x 2 KV heads
    after = asyncio.run(listing(location))
    assert sum(v for k, v in after.items() if k.endswith(".safetensors")) == report.bytes_kept
    assert {k for k in before if not k.endswith(".safetensors")} <= set(after)  # foreign objects stay


def test_gc_max_bytes_keeps_a_fragment_rewritten_while_it_runs(tmp_path: Path) -> None:
    _fill(str(tmp_path))
    for i, path in enumerate(sorted(tmp_path.rglob("*.safetensors"))):
        os.utime(path, (time.time() - 3600 - i, time.time() - 3600 - i))
    oldest = max(tmp_path.rglob("*.safetensors"), key=lambda p: -p.stat().st_mtime)
    rewritten = str(oldest.relative_to(tmp_path))

    class RacingStore(PosixStore):
        async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
            if rewritten in keys:
                await self.put(rewritten, await self.get(rewritten))
            return await super().head_many(keys)

    report = asyncio.run(gc(RacingStore(tmp_path), max_bytes=0))
    assert (report.over_cap, report.deleted) == (16, 15)
    assert oldest.exists()


def test_gc_removes_stale_temporary_files(tmp_path: Path) -> None:
    _fill(str(tmp_path))
    fanout = next(tmp_path.rglob("*.safetensors")).parent
    old, fresh, linked = fanout / ".tmp-crashed", fanout / ".tmp-writing", fanout / ".tmp-link"
    outside = tmp_path.parent / f"{tmp_path.name}-outside.tmp"
    for path in (old, fresh, outside):
        path.write_bytes(b"partial")
    linked.symlink_to(outside)
    two_hours_ago = time.time() - 7200
    for path in (old, outside):
        os.utime(path, (two_hours_ago, two_hours_ago))
    os.utime(linked, (two_hours_ago, two_hours_ago), follow_symlinks=False)

    dry = asyncio.run(gc(str(tmp_path), older_than=86400, stale_after=3600, dry_run=True))
    assert dry.uploads_aborted == 1 and old.exists()
    other = "model-b" if fanout.parent.name == "model-a" else "model-a"
    assert asyncio.run(gc(str(tmp_path), older_than=86400, stale_after=3600, namespace=other)).uploads_aborted == 0
    assert asyncio.run(gc(str(tmp_path), older_than=86400)).uploads_aborted == 0  # stale after a day, here
    report = asyncio.run(gc(str(tmp_path), max_bytes=1 << 30))  # stale after the default hour
    assert report.deleted == 0
    assert not old.exists() and fresh.exists() and linked.is_symlink() and outside.exists()
    outside.unlink()


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800), ("0s", 0), ("2w", 1209600)]
)
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


def test_stats_counts_objects_and_bytes_per_namespace(location: str, capsys) -> None:  # type: ignore[no-untyped-def]
    _fill(location)
    sizes = asyncio.run(listing(location))
    assert main(["stats", location]) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(line.split() for line in out if line.startswith("model-b "))
    assert row[1:4] == ["8", "4", "0"]  # objects (4 groups x 2 KV heads), groups, format-1 objects
    assert main(["ls", location, "model-b"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 8
    assert sum(int(line.split()[2]) for line in listed) == sum(v for k, v in sizes.items() if k.startswith("model-b/"))
