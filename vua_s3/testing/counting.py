"""A store that counts what vua_s3 asks of it (probes, their waves, reads, writes, bytes), for the
benches and tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from ..storage import Buffer, ObjectInfo, Store


class CountingStore(Store):
    """Another store, unchanged, with ``heads`` (keys probed), ``requests`` (probe requests an
    S3 store sends: one per key of ``head_many``, one per set of ``head_siblings``), ``lists``
    (those of them that are a LIST on S3: sets of two keys or more), ``waves`` (probe calls
    asking for at least one key), ``gets`` and ``puts`` (objects) and ``bytes_in`` and
    ``bytes_out`` counted since the last :meth:`reset`."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.reset()

    def reset(self) -> None:
        self.heads = self.requests = self.lists = self.waves = 0
        self.gets = self.puts = self.bytes_in = self.bytes_out = 0

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
            self.lists += sum(len(keys) > 1 for keys in asked)
            self.waves += 1
        return await self.inner.head_siblings(sets)

    async def get(self, key: str, size: int | None = None) -> bytearray:
        self.gets += 1
        data = await self.inner.get(key, size)
        self.bytes_in += len(data)
        return data

    async def get_into(self, key: str, out: memoryview) -> None:
        self.gets += 1
        await self.inner.get_into(key, out)
        self.bytes_in += out.nbytes

    async def put(self, key: str, data: Buffer) -> None:
        self.puts += 1
        self.bytes_out += memoryview(data).nbytes
        await self.inner.put(key, data)

    async def put_segments(self, key: str, segments: Sequence[memoryview]) -> None:
        self.puts += 1
        self.bytes_out += sum(segment.nbytes for segment in segments)
        await self.inner.put_segments(key, segments)

    async def put_checked(self, key: str, segments: Sequence[memoryview], crc32c: int) -> None:
        self.puts += 1
        self.bytes_out += sum(segment.nbytes for segment in segments)
        await self.inner.put_checked(key, segments, crc32c)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix)

    async def close(self) -> None:
        await self.inner.close()
