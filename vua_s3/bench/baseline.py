"""The floor: plain aioboto3 calls moving the same objects with the store's own settings."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any

import aioboto3

from ..loop import gather_or_cancel
from ..storage.s3 import S3Store


class Floor:
    """Plain aioboto3 calls moving the same objects with the store's own settings."""

    def __init__(self, store: S3Store, session: aioboto3.Session) -> None:
        self.store = store
        self.settings = store.settings
        self._session = session
        self._client: Any = None
        self._context: Any = None
        self._limit: asyncio.Semaphore | None = None

    async def open(self) -> None:
        s = self.settings
        self._context = self._session.client(
            "s3",
            endpoint_url=s.endpoint_url,
            region_name=s.region,
            verify=s.ca_bundle if s.ca_bundle and s.verify else s.verify,
            config=s.botocore_config(),
        )
        self._client = await self._context.__aenter__()
        self._limit = asyncio.Semaphore(s.concurrency)

    async def close(self) -> None:
        if self._context is not None:
            await self._context.__aexit__(None, None, None)
        await self.store.close()

    def _name(self, key: str) -> str:
        return f"{self.store.prefix}/{key}" if self.store.prefix else key

    async def _limited(self, request: Callable[[], Any]) -> Any:
        assert self._limit is not None
        async with self._limit:
            return await request()

    def prepare(self, body: bytes) -> list[bytes]:
        """The bodies of one object's requests, cut before the clock starts."""
        if len(body) <= self.settings.multipart_threshold:
            return [body]
        step = self.settings.part_size
        return [body[i : i + step] for i in range(0, len(body), step)]

    async def put(self, key: str, parts: list[bytes]) -> None:
        c, bucket, name = self._client, self.store.bucket, self._name(key)
        if len(parts) == 1:
            await self._limited(lambda: c.put_object(Bucket=bucket, Key=name, Body=parts[0]))
            return
        created = await self._limited(lambda: c.create_multipart_upload(Bucket=bucket, Key=name))
        upload_id = created["UploadId"]

        async def part(number: int, body: bytes) -> dict[str, Any]:
            r = await self._limited(
                lambda: c.upload_part(Bucket=bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=body)
            )
            return {"PartNumber": number, "ETag": r["ETag"]}

        done = await gather_or_cancel(*(part(n, b) for n, b in enumerate(parts, 1)))
        await self._limited(
            lambda: c.complete_multipart_upload(
                Bucket=bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
        )

    async def get(self, key: str, size: int) -> list[bytes]:
        c, bucket, name = self._client, self.store.bucket, self._name(key)

        async def read(**kwargs: Any) -> bytes:
            async def request() -> bytes:
                response = await c.get_object(Bucket=bucket, Key=name, **kwargs)
                async with response["Body"] as body:
                    return bytes(await body.read())

            return await self._limited(request)  # type: ignore[no-any-return]

        if size <= self.settings.multipart_threshold:
            return [await read()]
        step = self.settings.part_size
        return await gather_or_cancel(
            *(read(Range=f"bytes={i}-{min(i + step, size) - 1}") for i in range(0, size, step))
        )

    async def head(self, key: str) -> None:
        await self._limited(lambda: self._client.head_object(Bucket=self.store.bucket, Key=self._name(key)))

    async def list(self, keys: Sequence[str]) -> None:
        """One LIST page of the keys' common prefix, as the store probes one group's heads."""
        prefix = self._name(os.path.commonprefix(list(keys)))  # noqa: RUF071 - a key prefix, character by character
        await self._limited(lambda: self._client.list_objects_v2(Bucket=self.store.bucket, Prefix=prefix))

    async def delete(self, keys: Sequence[str]) -> None:
        async def delete(key: str) -> None:
            await self._limited(lambda: self._client.delete_object(Bucket=self.store.bucket, Key=self._name(key)))

        await gather_or_cancel(*(delete(key) for key in keys))


async def floor_put(floor: Floor, keys: list[str], bodies: list[list[bytes]]) -> None:
    await gather_or_cancel(*(floor.put(k, b) for k, b in zip(keys, bodies, strict=True)))


async def floor_get(floor: Floor, keys: list[str], sizes: list[int]) -> None:
    await gather_or_cancel(*(floor.get(k, s) for k, s in zip(keys, sizes, strict=True)))
