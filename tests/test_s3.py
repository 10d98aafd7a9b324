"""S3-specific behaviour, observed from the server's side (moto over HTTP)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache, unique_prefix

from vua_s3 import VUA, VUAConfig, open_store
from vua_s3.storage.s3 import S3Settings, S3Store
from vua_s3.testing.faultproxy import FaultProxy
from vua_s3.testing.moto import EmbeddedS3
from vua_s3.units import parse_size

CFG = VUAConfig(split_factor=256)


def via(proxy: FaultProxy, server: EmbeddedS3, prefix: str) -> str:
    """``server``'s URL for ``prefix``, through ``proxy``."""
    return server.url(prefix).replace(server.endpoint_url, proxy.endpoint_url)


def test_large_fragment_goes_through_multipart_and_ranged_reads(moto_server) -> None:  # type: ignore[no-untyped-def]
    prefix = unique_prefix()
    tokens = torch.randint(0, 100_000, (256,))
    kv = random_kvcache(layers=48, seq_len=256, heads=1, head_dim=128, dtype=torch.float32)  # one 12 MiB object
    with FaultProxy(moto_server.port) as proxy:  # sees every request, changes none
        url = via(proxy, moto_server, prefix) + "&multipart_threshold=5MiB&part_size=5MiB&transport=aiobotocore"
        with VUA(CFG, url) as vua:
            assert vua.put(tokens, kv) == 1
            res = vua.get_closest(tokens)
    assert res is not None
    ranges = [r.headers["range"] for r in proxy.requests if r.method == "GET" and "range" in r.headers]
    ranges.sort(key=lambda r: int(r.removeprefix("bytes=").split("-")[0]))
    assert_kv_equal(res.data, kv)

    client = moto_server.client()
    key = f"{prefix}/{CFG.tokens_to_paths(tokens)[0]}"
    head = client.head_object(Bucket=moto_server.bucket, Key=key)
    assert head["ContentLength"] > 12 << 20
    assert head["ETag"].strip('"').endswith("-3")  # S3 marks multipart objects "<md5>-<parts>"
    assert not client.list_multipart_uploads(Bucket=moto_server.bucket, Prefix=prefix).get("Uploads")
    size = head["ContentLength"]
    assert ranges == [
        f"bytes=0-{(5 << 20) - 1}",
        f"bytes={5 << 20}-{(10 << 20) - 1}",
        f"bytes={10 << 20}-{size - 1}",
    ]


def test_small_fragments_are_single_puts(moto_server) -> None:  # type: ignore[no-untyped-def]
    prefix = unique_prefix()
    tokens = torch.randint(0, 100_000, (32,))
    with VUA(VUAConfig(split_factor=16), moto_server.url(prefix)) as vua:
        vua.put(tokens, random_kvcache(seq_len=32))
    objects = moto_server.client().list_objects_v2(Bucket=moto_server.bucket, Prefix=prefix)["Contents"]
    assert len(objects) == 4  # 2 groups x 2 KV heads
    assert all("-" not in o["ETag"] for o in objects)


def test_settings_come_from_the_url() -> None:
    store = open_store(
        "s3://bkt/a/b/?endpoint_url=https://vast.example:8443&addressing=path&checksum=when_supported"
        "&verify=false&concurrency=7&part_size=8MiB&multipart_threshold=64m&region=eu-west-1&retry_mode=adaptive"
    )
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.url) == ("bkt", "a/b", "s3://bkt/a/b")
    s = store.settings
    assert s == S3Settings(
        endpoint_url="https://vast.example:8443",
        addressing="path",
        checksum="when_supported",
        verify=False,
        concurrency=7,
        part_size=8 << 20,
        multipart_threshold=64 << 20,
        region="eu-west-1",
        retry_mode="adaptive",
    )
    config = s.botocore_config()
    assert config.request_checksum_calculation == "when_supported"
    assert config.response_checksum_validation == "when_supported"
    assert config.max_pool_connections == 7
    assert config.s3 == {"addressing_style": "path", "payload_signing_enabled": False}  # HTTPS: TLS protects bodies
    assert S3Settings().checksum == "when_required"  # safe for every S3 system by default


@pytest.mark.parametrize(("text", "value"), [("5MiB", 5 << 20), ("8m", 8 << 20), ("1g", 1 << 30), ("4096", 4096)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_checksum_mode_when_supported_round_trips(moto_server) -> None:  # type: ignore[no-untyped-def]
    url = moto_server.url(unique_prefix()) + "&checksum=when_supported"
    tokens = torch.randint(0, 100_000, (32,))
    kv = random_kvcache(seq_len=32)
    with VUA(VUAConfig(split_factor=16), url) as vua:
        vua.put(tokens, kv)
        res = vua.get_closest(tokens)
    assert res is not None
    assert_kv_equal(res.data, kv)


def test_one_client_per_event_loop(moto_server) -> None:  # type: ignore[no-untyped-def]
    """A client is opened (and the bucket checked, one HEAD of the bucket) once per event loop."""
    with FaultProxy(moto_server.port) as proxy:
        store = open_store(via(proxy, moto_server, unique_prefix()))

        async def use() -> None:
            await store.put("k/x", b"1")
            await asyncio.gather(*(store.head_many(["k/x"] * 5) for _ in range(4)))
            await store.close()

        asyncio.run(use())
        asyncio.run(use())
    bucket_checks = [r for r in proxy.requests if r.method == "HEAD" and r.path.rstrip("/") == f"/{moto_server.bucket}"]
    assert len(bucket_checks) == 2
    assert sum(r.method == "HEAD" for r in proxy.requests) == 2 + 2 * 20


def test_head_siblings_lists_once_per_set_and_heads_a_lone_key(moto_server) -> None:  # type: ignore[no-untyped-def]
    """A set of several keys is one LIST of their common prefix (a page more only while some
    are not found yet); a lone key is one HEAD. Counted in ``requests``, the direct path's
    tries included."""
    store = open_store(moto_server.url(unique_prefix()))
    assert isinstance(store, S3Store)

    async def go() -> None:
        sem = asyncio.Semaphore(32)

        async def put(i: int) -> None:
            async with sem:
                await store.put(f"p/k{i:04d}", b"x" * (i % 7))

        await asyncio.gather(*(put(i) for i in range(1001)))  # past one page of 1,000
        store.requests.clear()
        first, last, lone = await store.head_siblings([["p/k0000", "p/k1000"], ["p/k0001", "p/k0002"], ["p/k0006"]])
        assert [None if i is None else i.size for i in first + last + lone] == [0, 6, 1, 2, 6]
        # The direct path takes one complete page: the truncated listing goes to botocore (2 pages).
        assert store.requests == {"list_objects_v2": 4, "head_object": 1}
        store.requests.clear()
        missing = await store.head_siblings([["p/k2000", "p/k2001"]])
        assert missing == [[None, None]] and store.requests == {"list_objects_v2": 1}
        await store.close()

    asyncio.run(go())


def test_a_script_that_never_closes_its_vua_exits_quietly(moto_server) -> None:  # type: ignore[no-untyped-def]
    """The original VUA API has no close: whatever the process opened is closed at exit,
    without aiohttp's 'Unclosed client session' warnings."""
    script = (
        "import sys, torch\n"
        "from vua_s3 import VUA, VUAConfig\n"
        "vua = VUA(VUAConfig(split_factor=16), sys.argv[1])\n"
        "tokens = torch.arange(32)\n"
        "vua.put(tokens, [(torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8))])\n"
        "print(vua.get_closest(tokens).tokens.numel())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, moto_server.url(unique_prefix())], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "32"
    assert "Unclosed" not in done.stderr and "Traceback" not in done.stderr


def test_embedded_servers_in_one_process_do_not_share_objects() -> None:
    """moto keeps objects per process: a later server must not serve an earlier one's."""
    with EmbeddedS3() as first:
        first.client().put_object(Bucket=first.bucket, Key="kv/group", Body=b"x")
    with EmbeddedS3() as second:
        assert second.bucket != first.bucket
        assert second.client().list_objects_v2(Bucket=second.bucket).get("KeyCount") == 0
