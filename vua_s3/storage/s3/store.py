"""The S3 store (AWS S3, VAST, MinIO, Ceph RGW, SeaweedFS) over aioboto3, object data
over the awscrt C client when it is installed (``crt.py``).

One long-lived client per event loop, its connection pool sized to ``concurrency``,
and one semaphore bounding every request it makes. Large objects go up as concurrent
multipart parts (aborted on any failure, so no partial object or orphaned upload
remains) and come down as concurrent ranged GETs into the caller's buffer.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aioboto3
import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from ... import logsafe
from ...errors import InvalidLocationError, ObjectNotFoundError, SizeMismatchError, StoreError
from ...logsafe import redact_url
from ...loop import gather_or_cancel
from ..base import Buffer, ObjectInfo, Store
from .body import receive
from .crt import CrtTransport
from .direct_probe import DirectProbe
from .errors import PRECONDITION_FAILED, error_code, map_error
from .settings import SSE_C_OPERATIONS, SSE_WRITES, S3Settings, crt_installed, sse_c_key
from .upload import Uploads

_T = TypeVar("_T")
#: What a refresh sets the Content-Type to, as the awscrt writer does (``crt.py``); no reader checks it.
CONTENT_TYPE = "application/octet-stream"


class _LoopClient:
    """The client, its context, the request limit and the direct HEAD path of one event loop."""

    def __init__(self, context: Any, client: Any, limit: asyncio.Semaphore, direct: DirectProbe | None) -> None:
        self.context = context
        self.client = client
        self.limit = limit
        self.direct = direct
        self.after_direct: tuple[Any, Any] | None = None
        """(context, client) with one attempt less, for HEADs the direct path made the first try of."""


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        settings: S3Settings | None = None,
        *,
        session: aioboto3.Session | None = None,
    ) -> None:
        if not bucket:
            raise InvalidLocationError("an S3 location needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings or S3Settings()
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._session = session or aioboto3.Session(profile_name=self.settings.profile)
        self._sse_c_key = sse_c_key() if self.settings.sse == "sse-c" else None
        self._crt: CrtTransport | None = None
        self.bucket_url: str | None = None
        """The bucket's URL as botocore resolved it (endpoint, addressing), once connected."""
        self.region_name: str | None = None
        self._clients: dict[asyncio.AbstractEventLoop, _LoopClient] = {}
        self._client_lock: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self.requests: Counter[str] = Counter()
        """Requests made, by S3 operation (retries not counted): for benchmarks and diagnostics."""
        self._uploads = Uploads(bucket, self.settings, self._call)

    @classmethod
    def from_url(cls, url: str, *, session: aioboto3.Session | None = None) -> S3Store:
        """A store for ``s3://bucket/prefix?setting=value&...``."""
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise InvalidLocationError(
                f"credentials are not accepted in the URL ({redact_url(url)}): use AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, a profile or an instance role"
            )
        if not parts.netloc:
            raise InvalidLocationError(f"S3 URL {redact_url(url)!r} has no bucket: use s3://bucket/prefix")
        return cls(parts.netloc, parts.path, S3Settings.from_query(parts.query), session=session)

    def object_key(self, key: str) -> str:
        """The S3 object key of a store key (under the store's prefix)."""
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _open_client(self, s: S3Settings) -> tuple[Any, Any]:
        """An entered aiobotocore client for ``s`` and its context (to exit on close)."""
        context = self._session.client("s3", **s.client_kwargs())
        return context, await context.__aenter__()

    async def _client(self) -> _LoopClient:
        """This loop's client, created (and the bucket checked) on first use."""
        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is not None:
            return found
        lock = self._client_lock.setdefault(loop, asyncio.Lock())
        async with lock:
            found = self._clients.get(loop)
            if found is not None:
                return found
            s = self.settings
            context, client = await self._open_client(s)
            logsafe.install()
            for operation in SSE_C_OPERATIONS:
                client.meta.events.register(f"provide-client-params.s3.{operation}", self._add_sse)
            bucket_urls: list[str] = []
            client.meta.events.register(
                "before-send.s3.HeadBucket", lambda request, **_: bucket_urls.append(request.url)
            )
            try:
                await client.head_bucket(Bucket=self.bucket)
            except BaseException as exc:
                await context.__aexit__(None, None, None)
                if isinstance(exc, (ClientError, BotoCoreError)):
                    raise self._error(exc, "head_bucket", "") from None
                raise
            direct = None
            if bucket_urls:
                self.bucket_url, self.region_name = bucket_urls[-1], client.meta.region_name
            credentials = await self._session.get_credentials()
            if bucket_urls and credentials is not None and self._sse_c_key is None and DirectProbe.usable():
                # The bucket's URL as botocore resolved it (endpoint, addressing, region).
                direct = DirectProbe(bucket_urls[-1], client.meta.region_name, credentials, s)
            if bucket_urls and credentials is not None and self._crt is None and self._uses_crt():
                self._crt = CrtTransport(
                    bucket_urls[-1],
                    client.meta.region_name,
                    credentials,
                    part_size=s.part_size,
                    multipart_threshold=s.multipart_threshold,
                    max_attempts=s.max_attempts,
                    connect_timeout=s.connect_timeout,
                    concurrency=s.concurrency,
                    verify=s.verify,
                    ca_bundle=s.ca_bundle,
                    sign_payload=s.signs_payload(),
                    checksums=s.checksum == "when_supported",
                )
            found = _LoopClient(context, client, asyncio.Semaphore(s.concurrency), direct)
            self._clients[loop] = found
            return found

    def _uses_crt(self) -> bool:
        s = self.settings
        if s.transport == "auto":
            return s.sse == "none" and DirectProbe.usable() and crt_installed()
        return s.transport == "crt"

    @property
    def transport(self) -> str:
        """The data path in use (``crt`` or ``aiobotocore``), known once the store has connected."""
        return "crt" if self._crt is not None else "aiobotocore"

    async def _after_direct_client(self, lc: _LoopClient) -> Any:
        """A client with one attempt less than the settings allow (at least one), so a HEAD
        whose first try went the direct way still makes ``max_attempts`` tries in all."""
        if lc.after_direct is None:
            s = self.settings
            context, client = await self._open_client(replace(s, max_attempts=max(1, s.max_attempts - 1)))
            if lc.after_direct is not None:  # another task made one meanwhile
                await context.__aexit__(None, None, None)
            else:
                lc.after_direct = (context, client)
        return lc.after_direct[1]

    def sse_params(self, operation: str) -> dict[str, Any]:
        """The encryption parameters the settings add to an S3 ``operation`` (e.g. ``PutObject``)."""
        s = self.settings
        if self._sse_c_key is not None and operation in SSE_C_OPERATIONS:
            return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": self._sse_c_key}
        if operation not in SSE_WRITES or s.sse in ("none", "sse-c"):
            return {}
        if s.sse == "sse-s3":
            return {"ServerSideEncryption": "AES256"}
        params = {"ServerSideEncryption": "aws:kms"}
        if s.sse_kms_key_id:
            params["SSEKMSKeyId"] = s.sse_kms_key_id
        return params

    def _add_sse(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        """botocore hook: every request of the data path carries the configured encryption."""
        for name, value in self.sse_params(model.name).items():
            params.setdefault(name, value)

    def _error(self, exc: BaseException, operation: str, key: str) -> StoreError:
        where = f"s3://{self.bucket}/{self.object_key(key)}" if key else f"bucket {self.bucket!r}"
        return map_error(exc, operation, where, bucket=self.bucket, endpoint=self.endpoint())

    def endpoint(self) -> str:
        """The endpoint, for messages."""
        return self.settings.endpoint_url or "the default AWS endpoint"

    async def _call(
        self, operation: str, key: str, request: Callable[[Any], Awaitable[_T]], *, after_direct: bool = False
    ) -> _T:
        """Run one request under the store's concurrency limit, mapping its errors.
        ``after_direct``: the direct HEAD was its first try; botocore makes the others."""
        lc = await self._client()
        client = await self._after_direct_client(lc) if after_direct else lc.client
        self.requests[operation] += 1
        async with lc.limit:
            try:
                return await request(client)
            except (ClientError, BotoCoreError, aiohttp.ClientError) as exc:
                raise self._error(exc, operation, key) from None

    async def get(self, key: str, size: int | None = None) -> bytearray:
        if size is None:
            return await self._call("get_object", key, lambda c: self._read_whole(c, self.object_key(key)))
        buf = bytearray(size)
        await self.get_into(key, memoryview(buf))
        return buf

    async def get_into(self, key: str, out: memoryview) -> None:
        name = self.object_key(key)
        size = len(out)
        await self._client()
        crt = self._crt
        if crt is not None and size:  # the C client answers an empty object with 416
            await self._call("get_object", key, lambda _: crt.get_into(name, out.cast("B")))
            return
        if size <= self.settings.multipart_threshold:
            await self._call("get_object", key, lambda c: self._read(c, name, out))
            return
        step = self.settings.part_size

        async def read_range(start: int) -> None:
            end = min(start + step, size)
            await self._call("get_object", key, lambda c: self._read(c, name, out, start, end))

        await gather_or_cancel(*(read_range(start) for start in range(0, size, step)))

    async def _read_whole(self, client: Any, name: str) -> bytearray:
        """GET ``name`` whole into a new buffer of the size the server announces."""
        response = await client.get_object(Bucket=self.bucket, Key=name)
        buf = bytearray(int(response["ContentLength"]))
        await receive(response["Body"], memoryview(buf), name)
        return buf

    async def _read(self, client: Any, name: str, buf: memoryview, start: int = 0, end: int | None = None) -> None:
        """GET ``name`` whole into ``buf``, which it must fill exactly, or bytes ``[start, end)``
        of it into the same bytes of ``buf``."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if end is not None:
            kwargs["Range"] = f"bytes={start}-{end - 1}"
        response = await client.get_object(**kwargs)
        length = int(response["ContentLength"])
        expected = len(buf) if end is None else end - start
        if length != expected:
            response["Body"].close()
            too = "short" if length < expected else "long"
            raise SizeMismatchError(f"the answer for {name} is too {too}: {length} bytes, expected {expected}")
        await receive(response["Body"], buf[start : start + length], name)

    async def put(self, key: str, data: Buffer) -> None:
        await self.put_segments(key, [memoryview(data)])

    async def put_segments(self, key: str, segments: Sequence[memoryview]) -> None:
        await self._put(key, segments, None)

    async def put_checked(self, key: str, segments: Sequence[memoryview], crc32c: int) -> None:
        await self._put(key, segments, crc32c)

    async def _put(self, key: str, segments: Sequence[memoryview], crc32c: int | None) -> None:
        views = [s.cast("B") if s.format != "B" or s.ndim != 1 else s for s in segments]
        await self._client()
        await self._uploads.put(key, self.object_key(key), views, sum(len(s) for s in views), crc32c, self._crt)

    @property
    def sends_checksum(self) -> bool:
        """Whether single-request PUTs carry ``x-amz-checksum-crc32c`` now (``upload_checksum``)."""
        return self._uploads.sends_checksum

    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        return await gather_or_cancel(*(self._head(key) for key in keys))

    async def _head(self, key: str) -> ObjectInfo | None:
        lc = await self._client()
        tried = False
        if lc.direct is not None and lc.direct.enabled:
            self.requests["head_object"] += 1
            async with lc.limit:
                answered, found = await lc.direct.head(self.object_key(key))
            if answered:
                return None if found is None else ObjectInfo(key=key, size=found[0], last_modified=found[1])
            tried = True
        try:
            response = await self._call(
                "head_object",
                key,
                lambda c: c.head_object(Bucket=self.bucket, Key=self.object_key(key)),
                after_direct=tried,
            )
        except ObjectNotFoundError:
            return None
        return ObjectInfo(
            key=key, size=int(response["ContentLength"]), last_modified=response["LastModified"].timestamp()
        )

    async def head_siblings(self, sets: Sequence[Sequence[str]]) -> list[list[ObjectInfo | None]]:
        return await gather_or_cancel(*(self._head_set(keys) for keys in sets))

    async def _head_set(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        """One LIST of the keys' common prefix (every page, until all are found), mapped back
        to them; a lone key is a HEAD, which S3 bills at a fraction of a LIST (``docs/lookups.md``)."""
        if len(keys) < 2:
            return await self.head_many(keys)
        wanted: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            wanted.setdefault(self.object_key(key), []).append(i)
        prefix = os.path.commonprefix(list(keys))  # noqa: RUF071 - a key prefix, character by character
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.object_key(prefix)}
        answers: list[ObjectInfo | None] = [None] * len(keys)
        lc = await self._client()
        tried = False
        if lc.direct is not None and lc.direct.enabled:
            self.requests["list_objects_v2"] += 1
            async with lc.limit:
                answered, objects = await lc.direct.list_page(params["Prefix"])
            if answered:
                for name, size, modified in objects:
                    for i in wanted.get(name, ()):
                        answers[i] = ObjectInfo(key=keys[i], size=size, last_modified=modified)
                return answers
            tried = True

        async def page(client: Any) -> Any:
            return await client.list_objects_v2(**params)

        while True:
            listed = await self._call("list_objects_v2", prefix, page, after_direct=tried)
            tried = False
            for item in listed.get("Contents", []):
                for i in wanted.get(item["Key"], ()):
                    modified = item["LastModified"].timestamp()
                    answers[i] = ObjectInfo(key=keys[i], size=int(item["Size"]), last_modified=modified)
            if not listed.get("IsTruncated") or all(answer is not None for answer in answers):
                return answers
            params["ContinuationToken"] = listed["NextContinuationToken"]

    async def refresh(self, key: str, written_before: float) -> bool:
        """A copy of the object onto itself, done by the server (no bytes through the client),
        with the metadata replaced by what the writers set (none but the Content-Type) and the
        store's encryption sent again, as a replaced copy would otherwise take the bucket's
        default. The copy is conditional (``x-amz-copy-source-if-unmodified-since``, to the
        second): an object written or refreshed since is left alone (412). Copying onto
        itself is atomic per key; a deleted source is a 404, so nothing is resurrected."""
        name = self.object_key(key)
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": name,
            "CopySource": {"Bucket": self.bucket, "Key": name},
            "MetadataDirective": "REPLACE",
            "ContentType": CONTENT_TYPE,
            "CopySourceIfUnmodifiedSince": datetime.fromtimestamp(math.ceil(written_before), timezone.utc),
            **self.sse_params("PutObject"),
        }
        if self._sse_c_key is not None:
            params |= {"CopySourceSSECustomerAlgorithm": "AES256", "CopySourceSSECustomerKey": self._sse_c_key}

        async def copy(client: Any) -> bool:
            try:
                await client.copy_object(**params)
            except ClientError as exc:
                if error_code(exc) in PRECONDITION_FAILED:
                    return False
                raise
            return True

        try:
            return await self._call("copy_object", key, copy)
        except ObjectNotFoundError:
            return False

    async def delete(self, key: str) -> None:
        await self._call("delete_object", key, lambda c: c.delete_object(Bucket=self.bucket, Key=self.object_key(key)))

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        lc = await self._client()
        full_prefix = self.object_key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = lc.client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        key=item["Key"][strip:], size=int(item["Size"]), last_modified=item["LastModified"].timestamp()
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list_objects_v2", prefix) from None

    async def abort_incomplete(self, prefix: str, started_before: float, *, dry_run: bool = False) -> int:
        """Multipart uploads under ``prefix`` initiated before ``started_before``: aborted."""
        lc = await self._client()
        stale: list[dict[str, Any]] = []
        try:
            async for page in lc.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.object_key(prefix)
            ):
                stale += [u for u in page.get("Uploads", []) if u["Initiated"].timestamp() < started_before]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list_multipart_uploads", prefix) from None
        if not dry_run:
            for upload in stale:
                await self._abort_upload(upload["Key"], upload["UploadId"])
        return len(stale)

    async def _abort_upload(self, name: str, upload_id: str) -> None:
        await self._call(
            "abort_multipart_upload",
            name.removeprefix(self.object_key("")),
            lambda c: c.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id),
        )

    async def close(self) -> None:
        crt, self._crt = self._crt, None
        if crt is not None:
            await crt.close()
        clients, self._clients = self._clients, {}
        self._client_lock.clear()
        loop = asyncio.get_running_loop()
        for owner, lc in clients.items():
            if owner is loop:
                await lc.context.__aexit__(None, None, None)
                if lc.direct is not None:
                    await lc.direct.close()
                if lc.after_direct is not None:
                    await lc.after_direct[0].__aexit__(None, None, None)
