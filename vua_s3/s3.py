"""S3 backend (AWS S3, VAST, MinIO, Ceph RGW, SeaweedFS) over aioboto3.

Settings come from the URL's query string and the standard AWS chain, never
credentials in the URL::

    s3://bucket/prefix?endpoint_url=https://vast.example:443&addressing=path&checksum=when_required

One long-lived client per event loop, its connection pool sized to
``concurrency``, and one semaphore bounding every request it makes. Large
objects go up as concurrent multipart parts (aborted on any failure, so no
partial object or orphaned upload remains) and come down as concurrent ranged
GETs into one preallocated buffer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import os
import re
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, fields, replace
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

import aioboto3
import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from yarl import URL

from . import logsafe
from .errors import AccessDeniedError, InvalidLocationError, ObjectNotFoundError, StoreError, StoreUnavailableError
from .loop import gather_or_cancel
from .store import Buffer, ObjectInfo, SizeMismatchError, Store, redact_url

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SECRET_SETTINGS = {
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
    "sse_c_key",
    "sse_customer_key",
}
#: Where an SSE-C key is read from (base64 of 32 bytes); never from the URL.
SSE_C_KEY_ENV = "VUA_S3_SSE_C_KEY"
_SSE_WRITES = ("PutObject", "CreateMultipartUpload")
_SSE_C_OPERATIONS = (*_SSE_WRITES, "UploadPart", "CompleteMultipartUpload", "GetObject", "HeadObject")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
# Answers that mean "try later", not "this request is wrong": an outage once retries are spent.
_UNAVAILABLE = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
}
MIN_PART_SIZE = 5 << 20  # S3's smallest allowed multipart part (all but the last)


def parse_size(text: str) -> int:
    """``"16MiB"``, ``"8m"``, ``"1048576"`` -> bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (use e.g. 16MiB, 8m or a byte count)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)[:1].lower()]


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _parse_positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"{value} must be positive")
    return value


def _parse_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"{value} must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class S3Settings:
    """Tunable S3 settings; each can be given in the URL query string by its name."""

    endpoint_url: str | None = None
    """Endpoint of a non-AWS system (VAST VIP pool, MinIO); AWS_ENDPOINT_URL also works."""
    region: str | None = None
    profile: str | None = None
    """Named AWS profile for credentials (a name, never the secret itself)."""
    addressing: str = "auto"
    """``path`` for VAST and most on-premises systems, ``virtual`` or ``auto`` for AWS."""
    checksum: str = "when_required"
    """``when_required`` sends and checks CRC checksums only where S3 demands them (works
    with every S3 system); ``when_supported`` is boto3's default since 1.36. Integrity of
    fragments is checked by vua_s3's own CRC either way."""
    verify: bool = True
    """Verify TLS certificates."""
    ca_bundle: str | None = None
    concurrency: int = 32
    """Requests in flight at once across the whole store (also the pool size)."""
    part_size: int = 16 << 20
    """Multipart part size and ranged-GET chunk size."""
    multipart_threshold: int = 128 << 20
    """Objects larger than this are uploaded in parts and read in ranges. Fragments already
    travel in parallel (one request each, ``max_inflight`` at once), so splitting them
    further only adds requests: on SeaweedFS one request per 32 MiB fragment moved as
    fast as 16 MiB parts or faster (README, "Performance"); 128 MiB keeps llama3-70b's
    80 MiB fragments whole too."""
    max_attempts: int = 5
    """Tries per request, the first included (as AWS_MAX_ATTEMPTS); 1 disables retries."""
    retry_mode: str = "standard"
    """botocore retry mode: ``standard`` (exponential backoff with jitter) or ``adaptive``
    (also slows the client down while the server throttles)."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    sse: str = "none"
    """Server-side encryption of new objects: ``sse-s3`` (AES256), ``sse-kms`` (with
    ``sse_kms_key_id`` or the bucket's default key) or ``sse-c`` (customer key, read
    from the environment variable ``VUA_S3_SSE_C_KEY``, base64; VAST and AWS)."""
    sse_kms_key_id: str | None = None

    @classmethod
    def from_query(cls, query: str) -> S3Settings:
        """Settings from a URL query string; unknown or malformed settings are errors."""
        settings = cls()
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name.lower() in _SECRET_SETTINGS:
                raise InvalidLocationError(
                    f"credentials ({name}) are not accepted in the URL: use AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY, a profile or an instance role"
                )
            parser = _SETTING_PARSERS.get(name)
            if parser is None:
                raise InvalidLocationError(
                    f"unknown S3 setting {name!r}; known settings: {', '.join(sorted(_SETTING_PARSERS))}"
                )
            try:
                settings = replace(settings, **{name: parser(value)})
            except ValueError as exc:
                raise InvalidLocationError(f"bad value for S3 setting {name!r}: {exc}") from None
        if settings.part_size < MIN_PART_SIZE:
            raise InvalidLocationError(f"part_size must be at least {MIN_PART_SIZE} bytes (an S3 limit)")
        if settings.sse_kms_key_id and settings.sse != "sse-kms":
            raise InvalidLocationError("sse_kms_key_id needs sse=sse-kms")
        return settings

    def botocore_config(self) -> Config:
        return Config(
            region_name=self.region,
            max_pool_connections=self.concurrency,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"total_max_attempts": self.max_attempts, "mode": self.retry_mode},
            s3={"addressing_style": self.addressing},
            request_checksum_calculation=self.checksum,
            response_checksum_validation=self.checksum,
        )


_SETTING_PARSERS: dict[str, Callable[[str], Any]] = {
    "endpoint_url": str,
    "region": str,
    "profile": str,
    "addressing": _parse_choice("auto", "path", "virtual"),
    "checksum": _parse_choice("when_required", "when_supported"),
    "verify": _parse_bool,
    "ca_bundle": str,
    "concurrency": _parse_positive,
    "part_size": parse_size,
    "multipart_threshold": parse_size,
    "max_attempts": _parse_positive,
    "retry_mode": _parse_choice("standard", "adaptive", "legacy"),
    "connect_timeout": _parse_seconds,
    "read_timeout": _parse_seconds,
    "sse": _parse_choice("none", "sse-s3", "sse-kms", "sse-c"),
    "sse_kms_key_id": str,
}
assert set(_SETTING_PARSERS) == {f.name for f in fields(S3Settings)}


def _sse_c_key() -> bytes:
    """The SSE-C key from the environment; errors never show the value."""
    text = os.environ.get(SSE_C_KEY_ENV, "")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise InvalidLocationError(
            f"sse=sse-c needs a 256-bit key, base64-encoded, in the environment variable {SSE_C_KEY_ENV}"
        )
    return key


class _SegmentBody(Payload):
    """A request body sent straight from many buffers (views of tensor memory): no join.

    aiohttp writes it segment by segment; to botocore it is a seekable file (which it
    measures, and over plain HTTP hashes for the signature, then rewinds on a retry).
    aiohttp's file payloads would instead read it in 256 KiB copies, each on a thread.
    """

    def __init__(self, segments: Sequence[memoryview]) -> None:
        super().__init__(segments, content_type="application/octet-stream")
        self._segments = [s.cast("B") if s.format != "B" or s.ndim != 1 else s for s in segments]
        self._length = sum(len(s) for s in self._segments)
        self._size = self._length  # aiohttp's Content-Length
        self._index = 0  # read position: segment, and offset in it
        self._offset = 0

    def __len__(self) -> int:
        return self._length

    def read(self, amt: int = -1) -> memoryview | bytes:
        """Up to ``amt`` bytes from one segment (short reads are allowed), ``b""`` at the end."""
        while self._index < len(self._segments) and self._offset >= len(self._segments[self._index]):
            self._index, self._offset = self._index + 1, 0
        if self._index == len(self._segments):
            return b""
        segment = self._segments[self._index]
        stop = len(segment) if amt is None or amt < 0 else min(len(segment), self._offset + amt)
        chunk = segment[self._offset : stop]
        self._offset = stop
        return chunk

    def tell(self) -> int:
        return sum(len(s) for s in self._segments[: self._index]) + self._offset

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self._length}[whence] + offset
        self._index, self._offset = 0, max(0, target)
        while self._index < len(self._segments) and self._offset > len(self._segments[self._index]):
            self._offset -= len(self._segments[self._index])
            self._index += 1
        return self.tell()

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._segments).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for segment in self._segments:
            await writer.write(segment)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        remaining = self._length if content_length is None else content_length
        for segment in self._segments:
            if remaining <= 0:
                break
            await writer.write(segment[:remaining])
            remaining -= len(segment)


def _cut(segments: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """The views covering bytes ``[start, end)`` of the concatenation of ``segments``."""
    out, position = [], 0
    for segment in segments:
        low, high = max(start - position, 0), min(end - position, len(segment))
        if low < high:
            out.append(segment[low:high])
        position += len(segment)
    return out


async def _receive(body: Any, view: memoryview, name: str) -> None:
    """Copy a response body into ``view`` chunk by chunk, as the socket delivered them.

    aiobotocore's ``readinto`` joins whatever chunks are buffered into a new bytes and
    then copies that; taking aiohttp's chunks one at a time leaves a single copy.
    """
    filled, length = 0, len(view)
    try:
        async with body:
            content = body.content  # the aiohttp StreamReader under aiobotocore's StreamingBody
            while filled < length:
                chunk, _ = await content.readchunk()
                if not chunk:
                    raise StoreUnavailableError(f"connection closed after {filled} of {length} bytes of {name}")
                if filled + len(chunk) > length:
                    raise StoreError(f"{name} sent more than the {length} bytes it announced")
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
        raise StoreUnavailableError(f"reading {name} failed after {filled} of {length} bytes: {failure}") from None


class _AskBotocore(Exception):
    """The direct HEAD got no clear answer: ask again through botocore."""


class _DirectHead:
    """HEADs sent with aiohttp and signed with botocore's SigV4 signer, without botocore's
    per-call pipeline: that costs ~3 ms of CPU per call on the reference VM, and a wave of
    HEADs runs on one loop thread (16 took ~60 ms that way, ~20 ms this way; README).

    Only clear answers are taken (200: present, 404: absent). Anything else (403, a
    redirect, a 5xx, a connection error) is asked again through botocore, which owns
    retries, redirects and error reporting; a connection error also turns this path off.
    """

    _PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

    def __init__(self, base_url: str, region: str, credentials: Any, settings: S3Settings) -> None:
        self._base = base_url.rstrip("/") + "/"
        self._region = region
        self._credentials = credentials
        ssl_context: ssl.SSLContext | bool = False
        if settings.verify:
            ssl_context = ssl.create_default_context(cafile=settings.ca_bundle)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.concurrency, ssl=ssl_context),
            timeout=aiohttp.ClientTimeout(sock_connect=settings.connect_timeout, sock_read=settings.read_timeout),
            auto_decompress=False,
        )
        self.enabled = True

    @classmethod
    def usable(cls) -> bool:
        """Not through a proxy: botocore's proxy handling stays in charge there."""
        return not any(os.environ.get(name) for name in cls._PROXY_VARIABLES)

    async def head(self, name: str) -> tuple[int, float] | None:
        """``(size, last_modified)``, ``None`` if absent; raises :class:`_AskBotocore` otherwise."""
        url = self._base + quote(name, safe="/~")
        request = AWSRequest(method="HEAD", url=url)
        S3SigV4Auth(await self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
        try:
            async with self._http.head(URL(url, encoded=True), headers=dict(request.headers.items())) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise _AskBotocore
                modified = parsedate_to_datetime(response.headers["Last-Modified"]).timestamp()
                return int(response.headers["Content-Length"]), modified
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError, TypeError):
            self.enabled = False
            log.info("direct HEADs turned off after a failure; HEADs go through botocore", exc_info=True)
            raise _AskBotocore from None

    async def close(self) -> None:
        await self._http.close()


class _LoopClient:
    """The client, its context, the request limit and the direct HEAD path of one event loop."""

    def __init__(self, context: Any, client: Any, limit: asyncio.Semaphore, direct: _DirectHead | None) -> None:
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
        self._sse_c_key = _sse_c_key() if self.settings.sse == "sse-c" else None
        self._clients: dict[asyncio.AbstractEventLoop, _LoopClient] = {}
        self._client_lock: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self.requests: Counter[str] = Counter()
        """Requests made, by S3 operation (retries not counted): for benchmarks and diagnostics."""

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

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _open_client(self, s: S3Settings) -> tuple[Any, Any]:
        """An entered aiobotocore client for ``s`` and its context (to exit on close)."""
        context = self._session.client(
            "s3",
            endpoint_url=s.endpoint_url,
            region_name=s.region,
            verify=s.ca_bundle if s.ca_bundle and s.verify else s.verify,
            config=s.botocore_config(),
        )
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
            for operation in _SSE_C_OPERATIONS:
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
            credentials = await self._session.get_credentials()
            if bucket_urls and credentials is not None and self._sse_c_key is None and _DirectHead.usable():
                # The bucket's URL as botocore resolved it (endpoint, addressing, region).
                direct = _DirectHead(bucket_urls[-1], client.meta.region_name, credentials, s)
            found = _LoopClient(context, client, asyncio.Semaphore(s.concurrency), direct)
            self._clients[loop] = found
            return found

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
        if self._sse_c_key is not None and operation in _SSE_C_OPERATIONS:
            return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": self._sse_c_key}
        if operation not in _SSE_WRITES or s.sse in ("none", "sse-c"):
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
        """A vua_s3 error naming the bucket, key and operation (never credentials)."""
        where = f"s3://{self.bucket}/{self._object_key(key)}" if key else f"bucket {self.bucket!r}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NOT_FOUND:
                if not key:
                    return StoreError(f"bucket {self.bucket!r} does not exist at {self._endpoint()}")
                return ObjectNotFoundError(f"{where} does not exist")
            if code in _DENIED or status == 403:
                return AccessDeniedError(
                    f"{operation} on {where} was refused ({code or status}): check the credentials "
                    "and that the policy allows this operation on the bucket and prefix"
                )
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist at {self._endpoint()}")
            if code in _UNAVAILABLE or (isinstance(status, int) and status >= 500):
                return StoreUnavailableError(f"{operation} on {where} failed after retries: {code or status}")
            return StoreError(f"{operation} on {where} failed: {code or status}")
        if isinstance(exc, SSLError):
            return StoreError(
                f"{operation} on {where}: TLS failed ({exc}); if the endpoint uses a private CA, "
                "set ca_bundle=/path/to/ca.pem in the URL"
            )
        if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, aiohttp.ClientError)):
            return StoreUnavailableError(f"{operation} on {where} failed: {type(exc).__name__}: {exc}")
        return StoreError(f"{operation} on {where} failed: {type(exc).__name__}: {exc}")

    def _endpoint(self) -> str:
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
            return await self._call("get_object", key, lambda c: self._read_whole(c, self._object_key(key)))
        buf = bytearray(size)
        await self.get_into(key, memoryview(buf))
        return buf

    async def get_into(self, key: str, out: memoryview) -> None:
        name = self._object_key(key)
        size = len(out)
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
        await _receive(response["Body"], memoryview(buf), name)
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
        await _receive(response["Body"], buf[start : start + length], name)

    async def put(self, key: str, data: Buffer) -> None:
        await self.put_segments(key, [memoryview(data)])

    async def put_segments(self, key: str, segments: Sequence[memoryview]) -> None:
        name = self._object_key(key)
        segments = [s.cast("B") if s.format != "B" or s.ndim != 1 else s for s in segments]
        size = sum(len(s) for s in segments)
        if size <= self.settings.multipart_threshold:
            body: Any = _SegmentBody(segments) if size else b""
            await self._call("put_object", key, lambda c: c.put_object(Bucket=self.bucket, Key=name, Body=body))
            return
        await self._put_multipart(key, name, segments, size)

    async def _put_multipart(self, key: str, name: str, segments: list[memoryview], size: int) -> None:
        created = await self._call(
            "create_multipart_upload", key, lambda c: c.create_multipart_upload(Bucket=self.bucket, Key=name)
        )
        upload_id = created["UploadId"]
        step = self.settings.part_size
        try:
            parts = await gather_or_cancel(
                *(
                    self._upload_part(key, name, upload_id, number, _SegmentBody(_cut(segments, start, start + step)))
                    for number, start in enumerate(range(0, size, step), 1)
                )
            )
            await self._call(
                "complete_multipart_upload",
                key,
                lambda c: c.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}
                ),
            )
        except BaseException:
            # Shielded so a cancelled put still removes its parts from the server.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._call(
                        "abort_multipart_upload",
                        key,
                        lambda c: c.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id),
                    )
                )
            raise

    async def _upload_part(
        self, key: str, name: str, upload_id: str, number: int, chunk: _SegmentBody
    ) -> dict[str, Any]:
        response = await self._call(
            "upload_part",
            key,
            lambda c: c.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=chunk),
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        return await gather_or_cancel(*(self._head(key) for key in keys))

    async def _head(self, key: str) -> ObjectInfo | None:
        lc = await self._client()
        tried = False
        if lc.direct is not None and lc.direct.enabled:
            self.requests["head_object"] += 1
            async with lc.limit:
                try:
                    found = await lc.direct.head(self._object_key(key))
                except _AskBotocore:
                    tried = True
                else:
                    return None if found is None else ObjectInfo(key=key, size=found[0], last_modified=found[1])
        try:
            response = await self._call(
                "head_object",
                key,
                lambda c: c.head_object(Bucket=self.bucket, Key=self._object_key(key)),
                after_direct=tried,
            )
        except ObjectNotFoundError:
            return None
        return ObjectInfo(
            key=key, size=int(response["ContentLength"]), last_modified=response["LastModified"].timestamp()
        )

    async def delete(self, key: str) -> None:
        await self._call("delete_object", key, lambda c: c.delete_object(Bucket=self.bucket, Key=self._object_key(key)))

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        lc = await self._client()
        full_prefix = self._object_key(prefix)
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

    async def close(self) -> None:
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
