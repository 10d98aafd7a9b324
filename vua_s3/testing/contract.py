"""The storage contract as a test suite: subclass :class:`StoreContract` once per backend.

In the spirit of zarr's ``StoreTests``: every verb of :class:`~vua_s3.storage.Store` is tried
over the backend's real transport, so a new backend (or a new transport of an old one) is
checked by adding a class, not by copying tests. A subclass provides two things:

* a ``location`` fixture: a fresh, empty location (URL, path or store) per test;
* :meth:`StoreContract.denied`: a context giving a location whose every request is refused.

Needs pytest (the ``dev`` extra); the library never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import torch
from awscrt.checksums import crc32c

from ..errors import AccessDeniedError, ObjectNotFoundError, SizeMismatchError
from ..storage import Location, Store, open_store

Scenario = Callable[[Store], Awaitable[None]]


def run_on(location: Location, scenario: Scenario) -> None:
    """Run ``scenario`` on a store opened at ``location`` in a fresh event loop, then close it."""

    async def main() -> None:
        store = open_store(location)
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


async def listed(store: Store, prefix: str = "") -> dict[str, int]:
    return {info.key: info.size async for info in store.list(prefix)}


class StoreContract:
    """What every backend promises (``vua_s3/storage/base.py``), one test per promise."""

    @pytest.fixture
    def location(self) -> Location:
        raise NotImplementedError("a backend's contract class provides a fresh location")

    @contextlib.contextmanager
    def denied(self) -> Iterator[Location]:
        raise NotImplementedError("a backend's contract class provides a location that refuses access")
        yield  # pragma: no cover

    def test_put_get_head_delete_list(self, location: Location) -> None:
        async def scenario(store: Store) -> None:
            assert await store.head_many(["ns/aa/one", "ns/bb/two"]) == [None, None]
            await store.put("ns/aa/one", b"first")
            await store.put("ns/bb/two", bytearray(b"second!"))
            one, two, three = await store.head_many(["ns/aa/one", "ns/bb/two", "ns/cc/three"])
            assert one is not None and one.size == 5 and one.key == "ns/aa/one"
            assert abs(one.last_modified - time.time()) < 300
            assert two is not None and two.size == 7
            assert three is None
            assert await store.get("ns/aa/one") == b"first"
            assert await store.get("ns/bb/two", size=7) == b"second!"
            assert await listed(store) == {"ns/aa/one": 5, "ns/bb/two": 7}
            assert await listed(store, "ns/aa") == {"ns/aa/one": 5}
            assert await listed(store, "other/") == {}
            await store.put("ns/aa/one", b"replaced")
            assert await store.get("ns/aa/one") == b"replaced"
            await store.delete("ns/aa/one")
            await store.delete("ns/aa/one")  # deleting a missing key is not an error
            assert await store.head_many(["ns/aa/one"]) == [None]
            assert await listed(store) == {"ns/bb/two": 7}

        run_on(location, scenario)

    def test_missing_key_is_not_found_for_every_read(self, location: Location) -> None:
        async def scenario(store: Store) -> None:
            with pytest.raises(ObjectNotFoundError):
                await store.get("ns/none")
            with pytest.raises(ObjectNotFoundError):
                await store.get("ns/none", size=10)
            with pytest.raises(KeyError):  # ObjectNotFoundError is a KeyError too
                await store.get_into("ns/none", memoryview(bytearray(10)))
            assert await store.head_many(["ns/none"]) == [None]

        run_on(location, scenario)

    def test_head_siblings_answers_each_set_of_keys(self, location: Location) -> None:
        """Present, missing and mixed sets, sizes, a lone key, an empty set; a key that is a
        prefix of stored keys (``g1.h1``), or a stored key that extends an asked one
        (``g1.h10`` beside ``g1.h1.st``), is never taken for it."""

        async def scenario(store: Store) -> None:
            for key, data in [("g1.h0.st", b"zero"), ("g1.h1.st", b"one!!"), ("g1.h10.st", b"ten"), ("g2.h0.st", b"")]:
                await store.put(f"ns/ab/{key}", data)
            await store.put("ns/ab/g1.h2.st.tmp", b"not the key")
            sets = [
                ["ns/ab/g1.h0.st", "ns/ab/g1.h1.st", "ns/ab/g1.h10.st"],
                ["ns/ab/g1.h1", "ns/ab/g1.h2.st"],
                ["ns/ab/g2.h0.st", "ns/ab/g2.h1.st"],
                ["ns/ab/g1.h1.st"],
                ["ns/zz/g9.h0.st"],
                [],
                ["ns/ab/g3.h0.st", "ns/ab/g3.h1.st"],
            ]
            answers = await store.head_siblings(sets)
            assert [[None if info is None else (info.key, info.size) for info in infos] for infos in answers] == [
                [("ns/ab/g1.h0.st", 4), ("ns/ab/g1.h1.st", 5), ("ns/ab/g1.h10.st", 3)],
                [None, None],
                [("ns/ab/g2.h0.st", 0), None],
                [("ns/ab/g1.h1.st", 5)],
                [None],
                [],
                [None, None],
            ]
            first = answers[0][0]
            assert first is not None and abs(first.last_modified - time.time()) < 300
            assert await store.head_siblings([]) == []

        run_on(location, scenario)

    def test_get_into_fills_exactly_the_callers_buffer(self, location: Location) -> None:
        data = os.urandom(3 << 20)

        async def scenario(store: Store) -> None:
            await store.put("ns/big", data)
            out = bytearray(len(data) + 16)
            view = memoryview(out)[8 : 8 + len(data)]
            await store.get_into("ns/big", view)
            assert out[8:-8] == data
            assert out[:8] == bytes(8) and out[-8:] == bytes(8)  # nothing written outside

        run_on(location, scenario)

    @pytest.mark.parametrize("delta", [-1, 1])
    def test_get_into_a_buffer_of_the_wrong_size_is_a_size_mismatch(self, location: Location, delta: int) -> None:
        async def scenario(store: Store) -> None:
            await store.put("ns/obj", b"x" * 1000)
            with pytest.raises(SizeMismatchError):
                await store.get_into("ns/obj", memoryview(bytearray(1000 + delta)))

        run_on(location, scenario)

    def test_put_segments_stores_their_concatenation(self, location: Location) -> None:
        values = torch.arange(1000, dtype=torch.float16)
        raw = bytearray(os.urandom(70_000))
        segments = [
            memoryview(b"header"),
            values.numpy().data,  # a typed view (format 'e'), taken as its bytes
            memoryview(raw)[100:60_100],
            memoryview(b""),
            memoryview(b"tail"),
        ]
        expected = b"header" + values.numpy().tobytes() + bytes(raw[100:60_100]) + b"tail"

        async def scenario(store: Store) -> None:
            await store.put_segments("ns/seg", segments)
            assert bytes(await store.get("ns/seg")) == expected
            info = (await store.head_many(["ns/seg"]))[0]
            assert info is not None and info.size == len(expected)
            await store.put_segments("ns/nothing", [])
            assert bytes(await store.get("ns/nothing")) == b""
            await store.put_checked("ns/checked", segments, crc32c(expected))
            assert bytes(await store.get("ns/checked")) == expected

        run_on(location, scenario)

    def test_empty_and_binary_payloads_round_trip(self, location: Location) -> None:
        data = os.urandom(100_000)

        async def scenario(store: Store) -> None:
            await store.put("bin/x", data)
            await store.put("bin/empty", b"")
            assert bytes(await store.get("bin/x")) == data
            assert bytes(await store.get("bin/empty")) == b""
            empty = (await store.head_many(["bin/empty"]))[0]
            assert empty is not None and empty.size == 0

        run_on(location, scenario)

    def test_concurrent_puts_of_one_key_leave_one_whole_object(self, location: Location) -> None:
        """Racing writers: a reader sees exactly one writer's bytes, never a mix or a partial."""
        payloads = [bytes([i]) * (256 * 1024 + i) for i in range(8)]

        async def scenario(store: Store) -> None:
            async def reader() -> list[bytes]:
                seen = []
                for _ in range(10):
                    with contextlib.suppress(ObjectNotFoundError):
                        seen.append(bytes(await store.get("race/key")))
                    await asyncio.sleep(0)
                return seen

            readers = asyncio.ensure_future(reader())
            await asyncio.gather(*(store.put("race/key", p) for p in payloads))
            seen = await readers
            final = bytes(await store.get("race/key"))
            for data in [*seen, final]:
                assert data in payloads
            assert await listed(store, "race/") == {"race/key": len(final)}  # no partial or temporary objects

        run_on(location, scenario)

    @pytest.mark.parametrize(
        "verb",
        [
            "head_many",
            "head_siblings",
            "head_sibling",
            "get",
            "get_into",
            "put",
            "put_segments",
            "put_checked",
            "list",
            "delete",
        ],
    )
    def test_refused_access_is_access_denied(self, verb: str) -> None:
        calls: dict[str, Callable[[Store], Awaitable[Any]]] = {
            "head_many": lambda s: s.head_many(["ns/k"]),
            "head_siblings": lambda s: s.head_siblings([["ns/k.h0", "ns/k.h1"]]),
            "head_sibling": lambda s: s.head_siblings([["ns/k.h0"]]),
            "get": lambda s: s.get("ns/k"),
            "get_into": lambda s: s.get_into("ns/k", memoryview(bytearray(4))),
            "put": lambda s: s.put("ns/k", b"data"),
            "put_segments": lambda s: s.put_segments("ns/k", [memoryview(b"da"), memoryview(b"ta")]),
            "put_checked": lambda s: s.put_checked("ns/k", [memoryview(b"da"), memoryview(b"ta")], crc32c(b"data")),
            "list": lambda s: listed(s, "ns/"),
            "delete": lambda s: s.delete("ns/k"),
        }

        async def scenario(store: Store) -> None:
            with pytest.raises(AccessDeniedError):
                await calls[verb](store)

        with self.denied() as location:
            run_on(location, scenario)
