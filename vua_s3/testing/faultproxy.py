"""A fault-injecting HTTP proxy for tests: real sockets on 127.0.0.1 between a client and an S3 server.

It understands just enough HTTP/1.1 to see request boundaries. Each request is sent
to the upstream server on a fresh connection (``Connection: close``) and the whole
answer is read before it is passed on, so a rule can rewrite or cut it. Rules
(:class:`Fault`) match on method, path and query and say what goes wrong:

* ``status``: answer with an S3 error (503 SlowDown, 500, 403 ...) without asking upstream
* ``reset``: reset the client connection after ``after_bytes`` of the request body
* ``delay``: answer ``delay`` seconds late
* ``hold``: wait until the test calls :meth:`FaultProxy.release` (``held`` is set meanwhile)
* ``truncate``: send the first ``after_bytes`` of the body with a matching Content-Length
* ``cut``: send the original Content-Length, ``after_bytes`` of the body, then reset
* ``flip``: invert the byte at ``offset`` of the body (negative counts from the end)
* ``flip_upload``: invert the byte at ``offset`` of the request body on its way upstream
* ``replace``: send ``body`` instead of the upstream body

:meth:`FaultProxy.down` stops listening and resets every open connection (the
server is gone); :meth:`FaultProxy.up` listens again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

_S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message><RequestId>faultproxy</RequestId></Error>"
)
_REASONS = {403: "Forbidden", 400: "Bad Request", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Request:
    """What the proxy saw of one request, and what it answered."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body_size: int
    status: int = 0
    fault: str = ""


@dataclass
class Fault:
    """One rule: requests it matches, what it does to them, and how many times."""

    action: str
    method: str | None = None
    path_contains: str | None = None
    query_contains: str | None = None
    header: str | None = None
    """Match only requests carrying this header (lower-case name)."""
    without_header: str | None = None
    """Match only requests lacking this header (lower-case name)."""
    times: int | None = None
    """Affect this many matching requests, then let them through; ``None``: all."""
    status: int = 503
    code: str = "SlowDown"
    after_bytes: int = 0
    offset: int = -1
    delay: float = 0.0
    body: bytes = b""
    hits: int = 0

    def matches(self, request: Request) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (
            (self.method is None or request.method == self.method)
            and (self.path_contains is None or self.path_contains in request.path)
            and (self.query_contains is None or self.query_contains in request.query)
            and (self.header is None or self.header in request.headers)
            and (self.without_header is None or self.without_header not in request.headers)
        )


@dataclass
class _Response:
    head: list[str]
    body: bytes
    status: int = field(init=False)

    def __post_init__(self) -> None:
        self.status = int(self.head[0].split()[1])

    def with_body(self, body: bytes, length: int | None = None) -> bytes:
        lines = [h for h in self.head if not h.lower().startswith(("content-length:", "connection:"))]
        lines.append(f"Content-Length: {len(body) if length is None else length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class FaultProxy:
    """The proxy, on its own event loop thread; ``faults`` may be changed between requests."""

    def __init__(self, upstream_port: int, *, tls: ssl.SSLContext | None = None) -> None:
        self.upstream_port = upstream_port
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.held = threading.Event()
        self._release = threading.Event()
        self._tls = tls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU time the proxy's thread has used (a bench charges it to the store side)."""
        if self._thread.ident is None:
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))

    def start(self) -> FaultProxy:
        self._thread.start()
        self.up()
        return self

    def stop(self) -> None:
        self.down()
        self.release()

        async def cancel_pending() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._run(cancel_pending())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def up(self) -> None:
        """Listen (again) on the proxy's port."""

        async def listen() -> None:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, ssl=self._tls, reuse_address=True
            )

        self._run(listen())

    def down(self) -> None:
        """Stop listening and reset every open connection, as if the server died."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                _reset(writer)

        self._run(close())

    def release(self) -> None:
        """Let held requests go on."""
        self._release.set()

    def served(self, action: str) -> int:
        """How many requests a fault of this kind has affected so far."""
        return sum(1 for r in self.requests if r.fault == action)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; ``False`` once the connection is over."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")[:-2]
        method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        url = urlsplit(target)
        request = Request(method, unquote(url.path), url.query, headers, 0)
        self.requests.append(request)
        fault = next((f for f in self.faults if f.matches(request)), None)
        if fault is not None:
            fault.hits += 1
            request.fault = fault.action
        length = int(headers.get("content-length", "0"))
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if fault is not None and fault.action == "reset":
            await reader.readexactly(min(fault.after_bytes, length))
            _reset(writer)
            return False
        body = await reader.readexactly(length) if length else await _read_chunked(reader, headers)
        request.body_size = len(body)
        if fault is not None and fault.action == "flip_upload" and body:
            damaged = bytearray(body)
            damaged[fault.offset] ^= 0xFF
            body = bytes(damaged)
        if fault is not None and fault.action == "status":
            payload = _S3_ERROR.format(code=fault.code, message=f"injected by faultproxy ({fault.code})").encode()
            if method == "HEAD":
                payload = b""
            reason = _REASONS.get(fault.status, "Error")
            answer = (
                f"HTTP/1.1 {fault.status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload
            request.status = fault.status
            writer.write(answer)
            await writer.drain()
            return True
        if fault is not None and fault.action == "delay":
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.action == "hold":
            self.held.set()
            await asyncio.to_thread(self._release.wait, 30)
        try:
            response = await self._forward(lines, body)
        except OSError:
            _reset(writer)
            return False
        request.status = response.status
        data = response.body
        if fault is None or fault.action in ("delay", "hold", "flip_upload"):
            writer.write(response.with_body(data, len(data) if method != "HEAD" else _length(response)))
        elif fault.action == "truncate":
            writer.write(response.with_body(data[: fault.after_bytes]))
        elif fault.action == "cut":
            writer.write(response.with_body(data[: fault.after_bytes], len(data)))
            await writer.drain()
            _reset(writer)
            return False
        elif fault.action == "flip":
            flipped = bytearray(data)
            flipped[fault.offset] ^= 0xFF
            writer.write(response.with_body(bytes(flipped)))
        elif fault.action == "replace":
            writer.write(response.with_body(fault.body))
        else:
            raise ValueError(f"unknown fault action {fault.action!r}")
        await writer.drain()
        return True

    async def _forward(self, lines: list[str], body: bytes) -> _Response:
        """Send the request upstream on a fresh connection and read the whole answer."""
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            kept = [h for h in lines[1:] if not h.lower().startswith(("connection:", "transfer-encoding:", "expect:"))]
            if body or not any(h.lower().startswith("content-length:") for h in kept):
                kept = [h for h in kept if not h.lower().startswith("content-length:")]
                kept.append(f"Content-Length: {len(body)}")
            up_writer.write(("\r\n".join([lines[0], *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))
            up_writer.write(body)
            await up_writer.drain()
            raw = await up_reader.read()
        finally:
            up_writer.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        response = _Response(head.decode("latin-1").split("\r\n"), rest)
        if any(h.lower() == "transfer-encoding: chunked" for h in response.head):
            response.head = [h for h in response.head if h.lower() != "transfer-encoding: chunked"]
            response.body = _dechunk(rest)
        return response


def _length(response: _Response) -> int:
    """The Content-Length a HEAD answer announced (its body is empty)."""
    for h in response.head:
        if h.lower().startswith("content-length:"):
            return int(h.split(":", 1)[1])
    return 0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: what a crashed server or a broken network looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_chunked(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return b""
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return bytes(out)
        out += chunk[:-2]


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)
