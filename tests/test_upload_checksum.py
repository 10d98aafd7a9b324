"""Puts unsigned but checked: over HTTPS bodies go as UNSIGNED-PAYLOAD by default, every
single-request PUT carries its CRC-32C as x-amz-checksum-crc32c, a server that checks it
refuses a body damaged on the way, and an endpoint that refuses the header loses it."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import struct
from pathlib import Path

import pytest
import torch
from awscrt.checksums import crc32c
from conftest import assert_kv_equal, random_kvcache, unique_prefix
from test_security import self_signed

from vua_s3 import VUA, StoreError, VUAConfig, open_store
from vua_s3.storage.s3 import S3Settings, S3Store
from vua_s3.testing.faultproxy import Fault, FaultProxy
from vua_s3.testing.moto import EmbeddedS3

CFG = VUAConfig(split_factor=16)
TOKENS = torch.arange(32)
KV = random_kvcache(seq_len=32)
TRANSPORTS = ["crt", "aiobotocore"]
HEADER = "x-amz-checksum-crc32c"


def via(server: EmbeddedS3, proxy: FaultProxy, extra: str = "", prefix: str | None = None) -> str:
    return (
        f"s3://{server.bucket}/{prefix or unique_prefix()}?endpoint_url={proxy.endpoint_url}&region=us-east-1"
        f"&addressing=path{extra}"
    )


def puts(proxy: FaultProxy) -> list[dict[str, str]]:
    return [r.headers for r in proxy.requests if r.method == "PUT"]


def test_auto_signs_bodies_over_plain_http_only() -> None:
    assert S3Settings(endpoint_url="http://10.0.0.1:9000").signs_payload()
    assert not S3Settings(endpoint_url="https://vast.example").signs_payload()
    assert not S3Settings().signs_payload()  # AWS: HTTPS
    assert S3Settings(endpoint_url="https://vast.example", payload_signing="on").signs_payload()
    assert S3Settings.from_query("upload_checksum=off").upload_checksum == "off"
    assert S3Settings().upload_checksum == "auto"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_put_carries_the_objects_crc32c(seaweed_server, transport: str) -> None:  # type: ignore[no-untyped-def]
    with FaultProxy(seaweed_server.port) as proxy:
        url = via(seaweed_server, proxy, f"&transport={transport}")
        with VUA(CFG, url) as vua:
            assert vua.put(TOKENS, KV) == 2  # groups, of two head objects each
            vua.forget_known()
            got = vua.get_closest(TOKENS)
    assert got is not None
    assert_kv_equal(got.data, KV)
    sent = puts(proxy)
    assert len(sent) == 4 and all(HEADER in h for h in sent)
    # The value is the CRC-32C of the stored bytes (SeaweedFS checks it too: it stored them).
    client = seaweed_server.client()
    for request in (r for r in proxy.requests if r.method == "PUT"):
        key = request.path.split(f"/{seaweed_server.bucket}/", 1)[1]
        body = client.get_object(Bucket=seaweed_server.bucket, Key=key)["Body"].read()
        assert request.headers[HEADER] == base64.b64encode(struct.pack(">I", crc32c(body))).decode()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_body_damaged_on_the_way_is_refused_when_the_checksum_goes_along(seaweed_server, transport: str) -> None:  # type: ignore[no-untyped-def]
    """Over plain HTTP with signing forced off, so only the checksum header can catch it."""
    unsigned = f"&transport={transport}&payload_signing=off"
    prefix = unique_prefix()
    with FaultProxy(seaweed_server.port) as proxy:
        proxy.faults = [Fault("flip_upload", method="PUT", offset=100)]
        url = via(seaweed_server, proxy, unsigned + "&max_attempts=2", prefix)
        with VUA(CFG, url) as vua, pytest.raises(StoreError, match="BadDigest"):
            vua.put(TOKENS, KV)
        listed = seaweed_server.client().list_objects_v2(Bucket=seaweed_server.bucket, Prefix=prefix)
        assert not listed.get("Contents")  # nothing stored
        assert proxy.served("flip_upload") >= 2  # and each damaged PUT was tried again

        # Damaged once: tried again, stored intact.
        proxy.faults = [Fault("flip_upload", method="PUT", offset=100, times=1)]
        with VUA(CFG, via(seaweed_server, proxy, unsigned)) as vua:
            assert vua.put(TOKENS, KV) == 2  # groups, of two head objects each
            vua.forget_known()
            got = vua.get_closest(TOKENS)
        assert got is not None
        assert_kv_equal(got.data, KV)

        # Without the header the damaged object is stored; only vua_s3's own CRC catches it on read.
        proxy.faults = [Fault("flip_upload", method="PUT", offset=100)]
        with VUA(CFG, via(seaweed_server, proxy, unsigned + "&upload_checksum=off")) as vua:
            assert vua.put(TOKENS, KV) == 2  # groups, of two head objects each
            proxy.faults = []
            vua.forget_known()
            assert vua.get_closest(TOKENS) is None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_endpoint_that_refuses_the_header_loses_it(moto_server, transport: str, caplog) -> None:  # type: ignore[no-untyped-def]
    refuse = Fault("status", method="PUT", header=HEADER, status=400, code="InvalidArgument")
    with FaultProxy(moto_server.port) as proxy:
        proxy.faults = [refuse]
        store = open_store(via(moto_server, proxy, f"&transport={transport}&max_attempts=1"))
        assert isinstance(store, S3Store)
        with caplog.at_level(logging.WARNING), VUA(CFG, store) as vua:
            assert vua.put(TOKENS, KV) == 2  # groups, of two head objects each
            assert not store.sends_checksum
        sent = puts(proxy)
        # The first PUT(s) in flight tried with the header and again without; the rest never sent it.
        assert refuse.hits >= 1 and len(sent) == 4 + refuse.hits
        assert sum(HEADER not in h for h in sent) == 4
        assert sum("refuses x-amz-checksum-crc32c" in r.message for r in caplog.records) == 1

        # upload_checksum=crc32c insists: the put fails.
        url = via(moto_server, proxy, f"&transport={transport}&upload_checksum=crc32c&max_attempts=1")
        with VUA(CFG, url) as vua, pytest.raises(StoreError, match="InvalidArgument"):
            vua.put(TOKENS, KV)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_over_https_bodies_go_unsigned_with_their_checksum(moto_server, tmp_path: Path, transport: str) -> None:  # type: ignore[no-untyped-def]
    context, ca = self_signed(tmp_path)
    data = os.urandom(100_000)
    with FaultProxy(moto_server.port, tls=context) as proxy:
        store = open_store(via(moto_server, proxy, f"&transport={transport}&ca_bundle={ca}"))

        async def put() -> None:
            try:
                await store.put("obj", data)
                assert bytes(await store.get("obj")) == data
            finally:
                await store.close()

        asyncio.run(put())
    (sent,) = puts(proxy)
    assert sent["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert sent[HEADER] == base64.b64encode(struct.pack(">I", crc32c(data))).decode()
