"""The S3 PUT path: one request carrying the body's CRC-32C, or a multipart upload.

A single-request PUT sends the CRC-32C of its body as ``x-amz-checksum-crc32c`` (base64 of
its four big-endian bytes) unless ``upload_checksum=off``: a server that checks it (AWS
S3, SeaweedFS) refuses a body damaged on the way with ``BadDigest``, and the PUT is tried
again (up to ``max_attempts``). With ``upload_checksum=auto`` an endpoint that refuses the header
itself (an error that is not about the body) gets the PUT again without it, and no header
from then on. Multipart uploads (objects above ``multipart_threshold``) carry no object
checksum. Whether bodies are signed is the transports' part (``payload_signing``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from awscrt.checksums import crc32c as crc32c_of
from botocore.exceptions import ClientError

from ...loop import gather_or_cancel
from .body import SegmentBody, cut
from .crt import CrtTransport
from .errors import error_code
from .settings import S3Settings

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Call = Callable[[str, str, Callable[[Any], Awaitable[Any]]], Awaitable[Any]]
"""The store's ``_call``: one request under its limit, errors mapped."""

#: What an endpoint that does not take the checksum header answers (never one about the body).
HEADER_REFUSED = frozenset({"400", "InvalidArgument", "InvalidRequest", "NotImplemented", "501"})
#: A server that checked the body's checksum and found it damaged.
BAD_DIGEST = "BadDigest"


def checksum_header(crc32c: int) -> str:
    """The ``x-amz-checksum-crc32c`` value of a CRC-32C."""
    return base64.b64encode(struct.pack(">I", crc32c)).decode("ascii")


def crc32c_of_segments(segments: Sequence[memoryview]) -> int:
    crc = 0
    for segment in segments:
        crc = crc32c_of(segment, crc)
    return crc


class Uploads:
    """The PUTs of one store (bucket, settings), each through the store's ``call``."""

    def __init__(self, bucket: str, settings: S3Settings, call: Call) -> None:
        self._bucket = bucket
        self._settings = settings
        self._call = call
        self.sends_checksum = settings.upload_checksum != "off"
        """Whether single-request PUTs carry ``x-amz-checksum-crc32c`` (``auto`` stops once refused)."""

    async def put(
        self,
        key: str,
        name: str,
        segments: list[memoryview],
        size: int,
        crc32c: int | None,
        crt: CrtTransport | None,
    ) -> None:
        """PUT the concatenation of ``segments`` (``size`` bytes) as ``name``; ``crc32c`` is
        its CRC-32C if the caller knows it (else computed here when it is sent)."""
        via_crt = crt is not None and size > 0 and crt.can_put(size)  # the C client answers empty bodies badly
        if size > self._settings.multipart_threshold:
            if via_crt:
                assert crt is not None
                await self._call("put_object", key, lambda _: crt.put(name, segments, size, None))
            else:
                await self._multipart(key, name, segments, size)
            return
        checksum = None
        if self.sends_checksum and size:
            checksum = checksum_header(crc32c_of_segments(segments) if crc32c is None else crc32c)

        async def send(client: Any, header: str | None) -> None:
            if via_crt:
                assert crt is not None
                await crt.put(name, segments, size, header)
                return
            body: Any = SegmentBody(segments) if size else b""
            extra = {} if header is None else {"ChecksumCRC32C": header}
            await client.put_object(Bucket=self._bucket, Key=name, Body=body, **extra)

        async def once(client: Any, header: str | None) -> None:
            await _retry_bad_digest(lambda: send(client, header), self._settings.max_attempts)

        async def attempt(client: Any) -> None:
            try:
                await once(client, checksum)
            except ClientError as exc:
                if (
                    checksum is None
                    or self._settings.upload_checksum != "auto"
                    or error_code(exc) not in HEADER_REFUSED
                ):
                    raise
                await once(client, None)  # the endpoint took the same PUT without the header
                if self.sends_checksum:
                    self.sends_checksum = False
                    log.warning(
                        "the endpoint refuses x-amz-checksum-crc32c (%s); uploads go without it from now on "
                        "(set upload_checksum=off to say so, see docs/storage.md)",
                        error_code(exc),
                    )

        await self._call("put_object", key, attempt)

    async def _multipart(self, key: str, name: str, segments: list[memoryview], size: int) -> None:
        bucket = self._bucket
        created = await self._call(
            "create_multipart_upload", key, lambda c: c.create_multipart_upload(Bucket=bucket, Key=name)
        )
        upload_id = created["UploadId"]
        step = self._settings.part_size
        try:
            parts = await gather_or_cancel(
                *(
                    self._part(key, name, upload_id, number, SegmentBody(cut(segments, start, start + step)))
                    for number, start in enumerate(range(0, size, step), 1)
                )
            )
            await self._call(
                "complete_multipart_upload",
                key,
                lambda c: c.complete_multipart_upload(
                    Bucket=bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}
                ),
            )
        except BaseException:
            # Shielded so a cancelled put still removes its parts from the server. The abort
            # then runs on alone: its failure is retrieved here (gc removes what it left).
            abort = asyncio.ensure_future(
                self._call(
                    "abort_multipart_upload",
                    key,
                    lambda c: c.abort_multipart_upload(Bucket=bucket, Key=name, UploadId=upload_id),
                )
            )
            abort.add_done_callback(lambda task: task.cancelled() or task.exception())
            with contextlib.suppress(Exception):
                await asyncio.shield(abort)
            raise

    async def _part(self, key: str, name: str, upload_id: str, number: int, chunk: SegmentBody) -> dict[str, Any]:
        response = await self._call(
            "upload_part",
            key,
            lambda c: c.upload_part(Bucket=self._bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=chunk),
        )
        return {"PartNumber": number, "ETag": response["ETag"]}


async def _retry_bad_digest(put: Callable[[], Awaitable[_T]], attempts: int) -> _T:
    """A body the server found damaged goes again, up to ``attempts`` tries in all (neither
    the C client nor botocore's standard retries take ``BadDigest`` for transient)."""
    for tried in range(1, attempts + 1):
        try:
            return await put()
        except ClientError as exc:
            if error_code(exc) != BAD_DIGEST or tried == attempts:
                raise
    raise AssertionError("unreachable")
