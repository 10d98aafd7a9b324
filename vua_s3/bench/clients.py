"""The best plain S3 clients, moving the bench's objects for comparison: boto3's s3transfer
(threads, ranged parts) and the awscrt C client. Same bytes, endpoint, credentials,
addressing and payload signing as the store; bodies are prepared before the clock starts,
and every GET lands in one fresh tensor of the full size (or, for awscrt, also in a
reused one, which shows what fresh memory costs)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
import torch
from boto3.s3.transfer import TransferConfig, create_transfer_manager

from ..storage.s3 import S3Store
from ..storage.s3.body import SegmentBody

#: s3transfer's part size and threads: its documented defaults, as a user would run it.
TRANSFER_PART = 8 << 20
TRANSFER_THREADS = 10


class _ViewFile(io.RawIOBase):
    """A seekable writable file over a slice of a preallocated buffer (s3transfer writes
    each ranged part at its offset)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._position = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = offset if whence == io.SEEK_SET else self._position + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def write(self, data: Any) -> int:
        n = len(data)
        self._view[self._position : self._position + n] = data
        self._position += n
        return n


def _slices(out: torch.Tensor, sizes: Sequence[int], offsets: Sequence[int] | None = None) -> list[memoryview]:
    """Views of ``out`` for objects of ``sizes``: one after another, or at ``offsets``."""
    view = out.numpy().data
    if offsets is None:
        offsets = [0, *itertools.accumulate(sizes)][:-1]
    return [view[at : at + size] for at, size in zip(offsets, sizes, strict=True)]


class TransferClient:
    """boto3 with s3transfer's TransferManager, as ``upload_fileobj``/``download_fileobj`` use it."""

    def __init__(self, store: S3Store, credentials: Any) -> None:
        s = store.settings
        self._client = boto3.session.Session(
            aws_access_key_id=credentials.access_key,
            aws_secret_access_key=credentials.secret_key,
            aws_session_token=credentials.token,
        ).client(
            "s3",
            endpoint_url=s.endpoint_url,
            region_name=s.region,
            verify=s.ca_bundle if s.ca_bundle and s.verify else s.verify,
            config=s.botocore_config(),
        )
        config = TransferConfig(
            multipart_threshold=TRANSFER_PART, multipart_chunksize=TRANSFER_PART, max_concurrency=TRANSFER_THREADS
        )
        self._manager = create_transfer_manager(self._client, config)
        self._bucket = store.bucket
        self._prefix = store.prefix

    def _name(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    def put(self, keys: Sequence[str], bodies: Sequence[bytes]) -> None:
        futures: list[Future[Any]] = [
            self._manager.upload(io.BytesIO(body), self._bucket, self._name(key))
            for key, body in zip(keys, bodies, strict=True)
        ]
        for future in futures:
            future.result()

    def get(self, keys: Sequence[str], sizes: Sequence[int]) -> torch.Tensor:
        out = torch.empty(sum(sizes), dtype=torch.uint8)
        futures = [
            self._manager.download(self._bucket, self._name(key), _ViewFile(view))
            for key, view in zip(keys, _slices(out, sizes), strict=True)
        ]
        for future in futures:
            future.result()
        return out

    def close(self) -> None:
        self._manager.shutdown()
        self._client.close()


class CrtClient:
    """The awscrt S3 client on its own: UNSIGNED-PAYLOAD bodies without a checksum header
    (its defaults), the store's part size and multipart threshold, GETs copied from
    ``on_body`` into place."""

    def __init__(self, store: S3Store, credentials: Any) -> None:
        """``store`` has connected (its bucket URL and region are resolved)."""
        from awscrt import auth, http, s3

        s = store.settings
        assert store.bucket_url is not None and store.region_name is not None
        region = store.region_name
        parts = urlsplit(store.bucket_url)
        provider = auth.AwsCredentialsProvider.new_static(
            credentials.access_key, credentials.secret_key, credentials.token
        )
        self._s3, self._http = s3, http
        self._host = parts.netloc
        self._base = parts.path.rstrip("/") + "/"
        self._prefix = store.prefix
        self._client = s3.S3Client(
            region=region,
            tls_mode=s3.S3RequestTlsMode.ENABLED if parts.scheme == "https" else s3.S3RequestTlsMode.DISABLED,
            signing_config=s3.create_default_s3_signing_config(region=region, credential_provider=provider),
            part_size=s.part_size,
            multipart_upload_threshold=s.multipart_threshold,
        )

    def _path(self, key: str) -> str:
        return self._base + quote(f"{self._prefix}/{key}" if self._prefix else key, safe="/~")

    def put(self, keys: Sequence[str], bodies: Sequence[bytes | memoryview]) -> None:
        """Bodies are read from the caller's memory into the client's part buffers, as vua_s3's are."""
        s3, http = self._s3, self._http
        requests = []
        for key, body in zip(keys, bodies, strict=True):
            headers = http.HttpHeaders([("Host", self._host), ("Content-Length", str(len(body)))])
            request = http.HttpRequest("PUT", self._path(key), headers, SegmentBody([memoryview(body)]))
            requests.append(self._client.make_request(type=s3.S3RequestType.PUT_OBJECT, request=request))
        for request in requests:
            request.finished_future.result()

    def get(
        self,
        keys: Sequence[str],
        sizes: Sequence[int],
        out: torch.Tensor | None = None,
        offsets: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Into ``out`` if given (reused memory, at ``offsets`` if given), else into a fresh tensor."""
        s3, http = self._s3, self._http
        target = torch.empty(sum(sizes), dtype=torch.uint8) if out is None else out
        requests = []
        for key, view in zip(keys, _slices(target, sizes, offsets), strict=True):

            def on_body(chunk: Any, offset: int, view: memoryview = view, **_: Any) -> None:
                view[offset : offset + len(chunk)] = chunk

            request = http.HttpRequest("GET", self._path(key), http.HttpHeaders([("Host", self._host)]))
            requests.append(
                self._client.make_request(type=s3.S3RequestType.GET_OBJECT, request=request, on_body=on_body)
            )
        for request in requests:
            request.finished_future.result()
        return target

    def close(self) -> None:
        shutdown = self._client.shutdown_event
        del self._client
        shutdown.wait(5.0)
