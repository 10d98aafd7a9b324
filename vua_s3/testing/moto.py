"""An S3 server on 127.0.0.1 for demos and tests: moto in server mode, over real HTTP."""

from __future__ import annotations

import importlib.util
import itertools
import socket
import subprocess
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import boto3

from .errors import ServerNotFoundError

if TYPE_CHECKING:
    from ..storage.s3 import S3Store

#: Credentials the embedded server accepts; it checks nothing, so they guard nothing.
EMBEDDED_CREDENTIALS = {"aws_access_key_id": "embedded", "aws_secret_access_key": "embedded"}
EMBEDDED_REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Embedded servers started in this process so far: names each one's default bucket.
_STARTED = itertools.count(1)


class EmbeddedS3:
    """A moto S3 server on a free loopback port, with one empty bucket created.

    ``with EmbeddedS3() as s3: VUA(cfg, s3.url("prefix"), ...)`` — the store must be
    given this server's credentials (see :meth:`session`) or find them in the env.

    moto keeps its objects per process, not per server: every server started in one
    process serves the same buckets, even after an earlier one stopped. So each gets a
    bucket of its own by default (``vua-cache``, then ``vua-cache-2`` ...), and a test never
    finds what an earlier test in the same process stored.
    """

    def __init__(self, bucket: str | None = None) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise ServerNotFoundError(
                "the embedded S3 server needs moto, which is not installed: pip install 'vua_s3[embedded]'"
            ) from None

        if bucket is None:
            number = next(_STARTED)
            bucket = "vua-cache" if number == 1 else f"vua-cache-{number}"
        self.bucket = bucket
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> EmbeddedS3:
        self._server.start()
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        self._server.stop()

    def url(self, prefix: str = "") -> str:
        """The vua_s3 location of ``prefix`` in this server's bucket."""
        return f"s3://{self.bucket}/{prefix}?endpoint_url={self.endpoint_url}&region={EMBEDDED_REGION}&addressing=path"

    def store(self, prefix: str = "") -> S3Store:
        """An :class:`S3Store` on ``prefix`` that uses this server's credentials."""
        import aioboto3

        from ..storage.s3 import S3Store

        return S3Store.from_url(self.url(prefix), session=aioboto3.Session(**EMBEDDED_CREDENTIALS))

    def client(self) -> Any:
        """A plain boto3 client for this server (setup, inspection)."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=EMBEDDED_REGION, **EMBEDDED_CREDENTIALS)

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class MotoProcess(EmbeddedS3):
    """moto's server in a process of its own (``python -m moto.server``), same face as
    :class:`EmbeddedS3`: a bench's client CPU time is then the client's alone. Stopped by pid."""

    def __init__(self, bucket: str = "vua-cache", startup_timeout: float = 30.0) -> None:
        if importlib.util.find_spec("moto") is None:
            raise ServerNotFoundError(
                "the S3 server needs moto, which is not installed: pip install 'vua_s3[embedded]'"
            )
        self.bucket = bucket
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoProcess:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self._timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self._process.returncode}")
            try:
                self.client().create_bucket(Bucket=self.bucket)
                return self
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's server did not answer in {self._timeout:.0f} s: {exc}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
