"""A store that counts its probes: keys, requests and waves (round trips), for the benches and tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from ..storage import Buffer, ObjectInfo, Store


class CountingStore(Store):
    """Another store, unchanged, with ``heads`` (keys probed), ``requests`` (probe requests an
    S3 store sends: one per key of ``head_many``, one per set of ``head_siblings``) and
    ``waves`` (probe calls asking for at least one key) counted since the last :meth:`reset`."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.heads = 0
        self.requests = 0
        self.waves = 0

    def reset(self) -> None:
        self.heads = self.requests = self.waves = 0

    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        if keys:
            self.heads += len(keys)
            self.requests += len(keys)
            self.waves += 1
        return await self.inner.head_many(keys)

    async def head_siblings(self, sets: Sequence[Sequence[str]]) -> list[list[ObjectInfo | None]]:
        asked = [keys for keys in sets if keys]
        if asked:
            self.heads += sum(map(len, asked))
            self.requests += len(asked)
            self.waves += 1
        return await self.inner.head_siblings(sets)

    async def get(self, key: str, size: int | None = None) -> bytearray:
        return await self.inner.get(key, size)

    async def get_into(self, key: str, out: memoryview) -> None:
        await self.inner.get_into(key, out)

    async def put(self, key: str, data: Buffer) -> None:
        await self.inner.put(key, data)

    async def put_segments(self, key: str, segments: Sequence[memoryview]) -> None:
        await self.inner.put_segments(key, segments)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix)

    async def close(self) -> None:
        await self.inner.close()
