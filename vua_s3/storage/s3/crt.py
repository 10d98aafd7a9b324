"""The awscrt data path (awscrt is a requirement of vua_s3): object GETs and PUTs through the AWS
Common Runtime's C S3 client, the one LMCache and s3torchconnector use.

It splits each transfer into parallel ranged parts, sizes its connection pool from a
throughput target, and signs, checksums and moves the bytes in C threads: nothing goes
through Python's socket layer or botocore's per-call pipeline. Only object data goes
this way; HEAD, DELETE and LIST stay on aiobotocore and the direct HEAD path.

Bytes are copied once each way: a PUT body is read from the caller's segment views into
the client's part buffers (``readinto``), a GET lands from the client's part buffers in
the caller's buffer at each part's absolute offset (``on_body``; the chunk is only valid
inside the callback). Errors come back as botocore errors, so ``errors.map_error`` maps
both transports' failures.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.exceptions import ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from ...errors import SizeMismatchError
from .body import SegmentBody

_SHARED: dict[tuple[Any, ...], Any] = {}
_SHARED_LOCK = threading.Lock()
_CODE_RE = re.compile(rb"<Code>([^<]{1,100})</Code>")


class CrtTransport:
    """One awscrt ``S3Client`` for a bucket URL as botocore resolved it (endpoint,
    addressing, region), with the store's settings."""

    def __init__(
        self,
        bucket_url: str,
        region: str,
        credentials: Any,
        *,
        part_size: int,
        multipart_threshold: int,
        max_attempts: int,
        connect_timeout: float,
        concurrency: int,
        verify: bool,
        ca_bundle: str | None,
        sign_payload: bool,
        checksums: bool,
    ) -> None:
        from awscrt import auth, io, s3

        self._s3 = s3
        parts = urlsplit(bucket_url)
        https = parts.scheme == "https"
        self._host = parts.netloc
        self._base = parts.path.rstrip("/") + "/"
        self._credentials = credentials
        self._frozen: Any = None
        self._auth = auth
        self._sign_payload = sign_payload
        self._multipart_threshold = multipart_threshold
        self._signing = s3.create_default_s3_signing_config(
            region=region, credential_provider=auth.AwsCredentialsProvider.new_delegate(self._current_credentials)
        )
        tls_options = None
        if https:
            tls = io.TlsContextOptions()
            tls.verify_peer = verify
            if ca_bundle and verify:
                tls.override_default_trust_store_from_path(None, ca_bundle)
            tls_options = io.ClientTlsContext(tls).new_connection_options()
            tls_options.set_server_name(parts.hostname or "")
        self._checksum_put = (
            s3.S3ChecksumConfig(algorithm=s3.S3ChecksumAlgorithm.CRC32, location=s3.S3ChecksumLocation.HEADER)
            if checksums
            else None
        )
        self._checksum_get = s3.S3ChecksumConfig(validate_response=True) if checksums else None
        retry = (
            s3.S3RetryConfig(max_retries=max_attempts - 1)
            if max_attempts > 1
            else s3.S3RetryConfig(retry_mode=s3.S3RetryMode.NONE)
        )
        # One C client per endpoint and settings for the whole process, shared by every store
        # on them: its connection pool and threads live as long as the process (a serving
        # process keeps its stores anyway), and a client whose requests were cancelled is
        # never left half shut down. Each request carries its own store's signing config.
        shared = (
            bucket_url, region, part_size, multipart_threshold, max_attempts, connect_timeout, concurrency, verify,
            ca_bundle,
        )  # fmt: skip
        with _SHARED_LOCK:
            client = _SHARED.get(shared)
            if client is None:
                client = s3.S3Client(
                    region=region,
                    tls_mode=s3.S3RequestTlsMode.ENABLED if https else s3.S3RequestTlsMode.DISABLED,
                    tls_connection_options=tls_options,
                    signing_config=self._signing,
                    part_size=part_size,
                    multipart_upload_threshold=multipart_threshold,
                    max_active_connections_override=concurrency,
                    retry_config=retry,
                    connect_timeout_ms=max(1, int(connect_timeout * 1000)),
                )
                _SHARED[shared] = client
        self._client = client

    def _current_credentials(self) -> Any:
        """The delegate the C client calls (on its threads) to sign: the credentials the
        store's session last resolved on the event loop."""
        frozen = self._frozen
        return self._auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)

    async def _refresh(self) -> None:
        """Resolve the session's credentials on the loop (refreshable ones renew here)."""
        self._frozen = await self._credentials.get_frozen_credentials()

    def _path(self, name: str) -> str:
        return self._base + quote(name, safe="/~")

    def can_put(self, size: int) -> bool:
        """Whether a PUT of ``size`` bytes can go this way: the C client cannot sign the
        payload of a multipart upload, so those go through botocore when signing is on."""
        return not self._sign_payload or size <= self._multipart_threshold

    async def get_into(self, name: str, out: memoryview) -> None:
        """GET ``name`` into ``out``, which it must fill exactly."""
        await self._refresh()
        s3 = self._s3
        length = len(out)
        received = 0
        mismatch: int | None = None  # the size the answer has, when it is not ``length``

        def on_headers(status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
            nonlocal mismatch
            if status_code in (200, 206):
                for key, value in headers:
                    if key.lower() == "content-length" and int(value) != length:
                        mismatch = int(value)

        def on_body(chunk: Any, offset: int, **_: Any) -> None:
            nonlocal received, mismatch
            end = offset + len(chunk)
            if mismatch is not None or end > length:
                mismatch = mismatch or end
                return
            out[offset:end] = chunk
            received += len(chunk)

        http_request = _http_request("GET", self._path(name), [("Host", self._host)], None)
        await self._run(
            "GetObject",
            lambda: self._client.make_request(
                type=s3.S3RequestType.GET_OBJECT,
                request=http_request,
                signing_config=self._signing,
                checksum_config=self._checksum_get,
                on_headers=on_headers,
                on_body=on_body,
            ),
        )
        found = received if mismatch is None and received != length else mismatch
        if found is not None:
            too = "short" if found < length else "long"
            raise SizeMismatchError(f"the answer for {name} is too {too}: {found} bytes, expected {length}")

    async def put(self, name: str, segments: Sequence[memoryview], size: int, checksum: str | None) -> None:
        """PUT the concatenation of ``segments`` (``size`` bytes) as ``name``, with
        ``checksum`` as its ``x-amz-checksum-crc32c`` if given (a single request only)."""
        await self._refresh()
        s3 = self._s3
        signing = self._signing
        if self._sign_payload:
            digest = await asyncio.to_thread(_sha256, segments)
            signing = self._signing.replace(signed_body_value=digest)
        headers = [
            ("Host", self._host),
            ("Content-Length", str(size)),
            ("Content-Type", "application/octet-stream"),
        ]
        if checksum is not None:
            headers.append(("x-amz-checksum-crc32c", checksum))
        http_request = _http_request("PUT", self._path(name), headers, SegmentBody(segments))
        await self._run(
            "PutObject",
            lambda: self._client.make_request(
                type=s3.S3RequestType.PUT_OBJECT,
                request=http_request,
                signing_config=signing,
                checksum_config=self._checksum_put if checksum is None else None,
            ),
        )

    async def _run(self, operation: str, start: Callable[[], Any]) -> None:
        """Start a request and wait for it; a cancelled wait cancels the request and still
        waits for its end, as the C client writes into (or reads from) the caller's memory."""
        request = start()
        done = asyncio.wrap_future(request.finished_future)
        # The request's error is always taken, also when the wait below is itself cancelled
        # again (a timeout, then a close): asyncio reports errors nobody took.
        done.add_done_callback(lambda future: future.cancelled() or future.exception())
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            request.cancel()
            await asyncio.wait([done])
            raise
        except Exception as exc:
            raise _botocore_error(exc, operation, self._host) from None

    async def close(self) -> None:
        """Nothing to release: the C client is the process's, shared (see ``__init__``)."""


def _http_request(method: str, path: str, headers: list[tuple[str, str]], body: Any) -> Any:
    from awscrt.http import HttpHeaders, HttpRequest

    return HttpRequest(method, path, HttpHeaders(headers), body)


def _sha256(segments: Sequence[memoryview]) -> str:
    digest = hashlib.sha256()
    for segment in segments:
        digest.update(segment)
    return digest.hexdigest()


def _botocore_error(exc: BaseException, operation: str, host: str) -> Exception:
    """The C client's failure as the botocore error the store already maps: an S3 answer
    as ``ClientError`` (its code from the XML body), anything else as a connection error."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        body = getattr(exc, "body", None) or b""
        match = _CODE_RE.search(body) if isinstance(body, bytes) else None
        code = match.group(1).decode("ascii", "replace") if match else str(status)
        response = {"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}}
        answer: Exception = ClientError(response, operation)
        return answer
    name = getattr(exc, "name", type(exc).__name__)
    failure: Exception = BotoConnectionError(error=f"{name} ({host}): {getattr(exc, 'message', exc)}")
    return failure
