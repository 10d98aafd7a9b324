"""The awscrt data path and its aiobotocore fallback: the same storage contract on moto and
SeaweedFS, payload signing as configured, and failures reported like the other path's."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Iterator

import aioboto3
import pytest
import test_store_contract as contract
import torch
from conftest import assert_kv_equal, random_kvcache, unique_prefix

from vua_s3 import VUA, AccessDeniedError, InvalidLocationError, ObjectNotFoundError, VUAConfig, open_store
from vua_s3.errors import SizeMismatchError
from vua_s3.storage import Store
from vua_s3.storage.s3 import S3Store
from vua_s3.testing.faultproxy import Fault, FaultProxy
from vua_s3.testing.moto import EmbeddedS3
from vua_s3.testing.seaweed import SeaweedS3

try:
    import awscrt  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("awscrt not installed (pip install 'vua_s3[crt]')", allow_module_level=True)

TRANSPORTS = ["crt", "aiobotocore"]


class TestMotoCrt(contract.TestMoto):
    transport = "crt"

    @pytest.fixture
    def location(self, moto_server: EmbeddedS3) -> str:
        return moto_server.url(unique_prefix()) + f"&transport={self.transport}"

    @contextlib.contextmanager
    def denied(self) -> Iterator[str]:
        with super().denied() as url:
            yield f"{url}&transport={self.transport}"


class TestMotoAiobotocore(TestMotoCrt):
    transport = "aiobotocore"


class TestSeaweedFSCrt(contract.TestSeaweedFS):
    transport = "crt"

    @pytest.fixture
    def location(self, seaweed_server: SeaweedS3) -> str:
        return seaweed_server.url(unique_prefix()) + f"&transport={self.transport}"

    @contextlib.contextmanager
    def denied(self) -> Iterator[Store]:
        session = aioboto3.Session(aws_access_key_id="embedded", aws_secret_access_key="not-the-secret")
        url = self.server.url(unique_prefix()) + f"&max_attempts=1&transport={self.transport}"
        yield S3Store.from_url(url, session=session)


class TestSeaweedFSAiobotocore(TestSeaweedFSCrt):
    transport = "aiobotocore"


@pytest.fixture(params=["moto", "seaweedfs"])
def server(request: pytest.FixtureRequest) -> EmbeddedS3:
    return request.getfixturevalue("moto_server" if request.param == "moto" else "seaweed_server")  # type: ignore[no-any-return]


def connected(url: str) -> S3Store:
    store = open_store(url)
    assert isinstance(store, S3Store)
    return store


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("checksum", ["when_required", "when_supported"])
def test_kv_round_trips_and_the_chosen_transport_moves_it(server, transport: str, checksum: str) -> None:  # type: ignore[no-untyped-def]
    url = server.url(unique_prefix()) + f"&transport={transport}&checksum={checksum}"
    tokens = torch.randint(0, 100_000, (256,))
    # One 12 MiB fragment: parallel ranged parts on the crt path (5 MiB parts).
    kv = random_kvcache(layers=6, seq_len=256, heads=8, head_dim=128, dtype=torch.float32)
    store = connected(url + "&part_size=5MiB")
    with VUA(VUAConfig(split_factor=256), store) as vua:
        assert vua.put(tokens, kv) == 1
        vua.forget_known()
        res = vua.get_closest(tokens)
        assert store.transport == transport
    assert res is not None
    assert_kv_equal(res.data, kv)


def test_auto_picks_crt_when_installed_and_aiobotocore_under_sse(moto_server) -> None:  # type: ignore[no-untyped-def]
    async def transport(url: str) -> str:
        store = connected(url)
        try:
            await store.put("k", b"x")
            return store.transport
        finally:
            await store.close()

    assert asyncio.run(transport(moto_server.url(unique_prefix()))) == "crt"
    assert asyncio.run(transport(moto_server.url(unique_prefix()) + "&sse=sse-s3")) == "aiobotocore"
    with pytest.raises(InvalidLocationError, match="transport=crt does not send SSE"):
        open_store(moto_server.url("p") + "&transport=crt&sse=sse-s3")
    with pytest.raises(InvalidLocationError, match="transport"):
        open_store(moto_server.url("p") + "&transport=fast")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("signing", "multipart"), [("off", False), ("on", False), ("on", True), ("auto", False)])
def test_payload_signing_setting_reaches_the_server(moto_server, transport: str, signing: str, multipart: bool) -> None:  # type: ignore[no-untyped-def]
    """moto keeps the request's x-amz-content-sha256: UNSIGNED-PAYLOAD, or the body's SHA-256
    (auto over plain HTTP signs, as botocore does)."""
    prefix = unique_prefix()
    extra = "&multipart_threshold=5MiB&part_size=5MiB" if multipart else ""
    data = os.urandom((11 << 20) if multipart else 1000)

    async def put() -> None:
        store = connected(moto_server.url(prefix) + f"&transport={transport}&payload_signing={signing}{extra}")
        try:
            await store.put("obj", data)
        finally:
            await store.close()

    asyncio.run(put())
    response = moto_server.client().get_object(Bucket=moto_server.bucket, Key=f"{prefix}/obj")
    assert response["Body"].read() == data
    sent = response["ResponseMetadata"]["HTTPHeaders"].get("x-amz-content-sha256")
    if signing == "off":
        assert sent == "UNSIGNED-PAYLOAD"
    elif not multipart:  # a multipart object keeps its last part's header; each was signed
        assert sent == hashlib.sha256(data).hexdigest()
    else:
        assert sent not in (None, "UNSIGNED-PAYLOAD")


def test_crt_failures_map_like_botocore_ones(seaweed_server) -> None:  # type: ignore[no-untyped-def]
    """SeaweedFS checks signatures: wrong credentials are a refusal, not a miss."""
    url = seaweed_server.url(unique_prefix()) + "&transport=crt"

    async def scenario() -> None:
        store = connected(url)
        try:
            await store.put("a", b"12345")
            with pytest.raises(ObjectNotFoundError):
                await store.get_into("missing", memoryview(bytearray(5)))
            for size in (4, 6):
                with pytest.raises(SizeMismatchError):
                    await store.get_into("a", memoryview(bytearray(size)))
            out = bytearray(5)
            await store.get_into("a", memoryview(out))
            assert out == b"12345"
        finally:
            await store.close()

    asyncio.run(scenario())

    # A GET the server refuses (as SeaweedFS refuses a bad signature) is a refusal on this path too.
    with FaultProxy(seaweed_server.port) as proxy:
        proxy.faults.append(Fault("status", method="GET", status=403, code="AccessDenied"))

        async def refused() -> None:
            through = seaweed_server.url(unique_prefix()).replace(seaweed_server.endpoint_url, proxy.endpoint_url)
            store = connected(through + "&transport=crt")
            try:
                await store.put("b", b"1")
                with pytest.raises(AccessDeniedError, match="get_object"):
                    await store.get_into("b", memoryview(bytearray(1)))
            finally:
                await store.close()

        asyncio.run(refused())


def test_crt_endpoint_down_is_a_miss(moto_server) -> None:  # type: ignore[no-untyped-def]
    """The bucket answered once, then nothing listens: reads are a miss, strict ones raise."""
    tokens = torch.randint(0, 100_000, (32,))
    with FaultProxy(moto_server.port) as proxy:
        url = moto_server.url(unique_prefix()).replace(moto_server.endpoint_url, proxy.endpoint_url)
        store = connected(url + "&transport=crt&max_attempts=1&connect_timeout=1")
        with VUA(VUAConfig(split_factor=16), store, timeout=10) as vua:
            vua.put(tokens, random_kvcache(seq_len=32))
            assert store.transport == "crt"
            vua.forget_known()
            proxy.down()
            assert vua.get_closest(tokens) is None
