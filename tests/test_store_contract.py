"""The storage contract, run against every backend over its real transport."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from vua_s3 import ObjectNotFoundError, open_store
from vua_s3.storage import Store


async def collect(store: Store, prefix: str = "") -> dict[str, int]:
    return {info.key: info.size async for info in store.list(prefix)}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_put_get_head_delete_list(location: str) -> None:
    async def scenario() -> None:
        store = open_store(location)
        try:
            assert await store.head_many(["ns/aa/one", "ns/bb/two"]) == [None, None]
            await store.put("ns/aa/one", b"first")
            await store.put("ns/bb/two", bytearray(b"second!"))
            one, two, three = await store.head_many(["ns/aa/one", "ns/bb/two", "ns/cc/three"])
            assert one is not None and one.size == 5 and one.key == "ns/aa/one"
            assert two is not None and two.size == 7
            assert three is None
            assert await store.get("ns/aa/one") == b"first"
            assert await store.get("ns/bb/two", size=7) == b"second!"
            assert await collect(store) == {"ns/aa/one": 5, "ns/bb/two": 7}
            assert await collect(store, "ns/aa") == {"ns/aa/one": 5}
            await store.put("ns/aa/one", b"replaced")
            assert await store.get("ns/aa/one") == b"replaced"
            await store.delete("ns/aa/one")
            await store.delete("ns/aa/one")  # deleting a missing key is not an error
            assert await store.head_many(["ns/aa/one"]) == [None]
            with pytest.raises(ObjectNotFoundError):
                await store.get("ns/aa/one")
        finally:
            await store.close()

    run(scenario())


def test_concurrent_puts_of_one_key_leave_one_whole_object(location: str) -> None:
    """Racing writers: a reader sees exactly one writer's bytes, never a mix or a partial."""
    payloads = [bytes([i]) * (256 * 1024 + i) for i in range(8)]

    async def scenario() -> None:
        store = open_store(location)
        try:

            async def reader() -> list[bytes]:
                seen = []
                for _ in range(10):
                    with contextlib.suppress(ObjectNotFoundError):
                        seen.append(bytes(await store.get("race/key")))
                    await asyncio.sleep(0)
                return seen

            results = await asyncio.gather(*(store.put("race/key", p) for p in payloads), reader())
            final = bytes(await store.get("race/key"))
            for data in [*results[-1], final]:
                assert data in payloads
        finally:
            await store.close()

    run(scenario())


def test_empty_and_binary_payloads_round_trip(location: str) -> None:
    data = os.urandom(100_000)

    async def scenario() -> None:
        store = open_store(location)
        try:
            await store.put("bin/x", data)
            await store.put("bin/empty", b"")
            assert bytes(await store.get("bin/x")) == data
            assert bytes(await store.get("bin/empty")) == b""
        finally:
            await store.close()

    run(scenario())
