"""Request and response bodies of the data path: bytes go out from, and come in to, the caller's memory."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from ...errors import StoreError, StoreUnavailableError


class SegmentBody(Payload):
    """A request body sent straight from many buffers (views of tensor memory): no join.

    aiohttp writes it segment by segment; to botocore it is a seekable file (which it
    measures, and over plain HTTP hashes for the signature, then rewinds on a retry);
    the awscrt client ``readinto``s its part buffers from it. aiohttp's file payloads
    would instead read it in 256 KiB copies, each on a thread.
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

    def readinto(self, target: Any) -> int:
        """Fill ``target`` from the segments, several a call; 0 at the end."""
        view = memoryview(target).cast("B")
        filled = 0
        while filled < len(view):
            chunk = self.read(len(view) - filled)
            if not chunk:
                break
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return filled

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


def cut(segments: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """The views covering bytes ``[start, end)`` of the concatenation of ``segments``."""
    out, position = [], 0
    for segment in segments:
        low, high = max(start - position, 0), min(end - position, len(segment))
        if low < high:
            out.append(segment[low:high])
        position += len(segment)
    return out


async def receive(body: Any, view: memoryview, name: str) -> None:
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
