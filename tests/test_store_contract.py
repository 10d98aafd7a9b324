"""The storage contract (``vua_s3.testing.contract``) on every backend, over its real transport."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import aioboto3
import pytest
from conftest import unique_prefix

from vua_s3.storage import Store
from vua_s3.storage.s3 import S3Store
from vua_s3.testing.contract import StoreContract
from vua_s3.testing.faultproxy import Fault, FaultProxy
from vua_s3.testing.moto import EmbeddedS3
from vua_s3.testing.seaweed import SeaweedS3

NOBODY = 65534


class TestPosix(StoreContract):
    @pytest.fixture
    def location(self, tmp_path_factory: pytest.TempPathFactory) -> str:
        return str(tmp_path_factory.mktemp("store"))

    @contextlib.contextmanager
    def denied(self) -> Iterator[str]:
        """A directory this process may not enter: as root (CI), the test drops to ``nobody``,
        since file modes do not bind root."""
        parent = tempfile.mkdtemp(prefix="vua-denied-")
        root = os.path.join(parent, "store")
        os.makedirs(os.path.join(root, "ns"))
        with open(os.path.join(root, "ns", "k"), "wb") as file:
            file.write(b"data")
        os.chmod(parent, 0o755)
        os.chmod(root, 0o700 if os.geteuid() == 0 else 0o000)
        try:
            if os.geteuid() == 0:
                os.seteuid(NOBODY)
            try:
                yield root
            finally:
                if os.getuid() == 0:
                    os.seteuid(0)
        finally:
            os.chmod(root, 0o700)
            shutil.rmtree(parent)


class TestMoto(StoreContract):
    @pytest.fixture
    def location(self, moto_server: EmbeddedS3) -> str:
        return moto_server.url(unique_prefix())

    @pytest.fixture(autouse=True)
    def _server(self, moto_server: EmbeddedS3) -> None:
        self.server = moto_server

    @contextlib.contextmanager
    def denied(self) -> Iterator[str]:
        """moto accepts any credentials, so a proxy in front of it refuses every request as
        S3 does (403 AccessDenied): the answer travels the real HTTP path."""
        with FaultProxy(self.server.port) as proxy:
            proxy.faults = [Fault("status", status=403, code="AccessDenied")]
            url = self.server.url(unique_prefix()).replace(self.server.endpoint_url, proxy.endpoint_url)
            yield url + "&max_attempts=1"


class TestSeaweedFS(StoreContract):
    @pytest.fixture
    def location(self, seaweed_server: SeaweedS3) -> str:
        return seaweed_server.url(unique_prefix())

    @pytest.fixture(autouse=True)
    def _server(self, seaweed_server: SeaweedS3) -> None:
        self.server = seaweed_server

    @contextlib.contextmanager
    def denied(self) -> Iterator[Store]:
        """SeaweedFS checks signatures: a client with the wrong secret is refused."""
        session = aioboto3.Session(aws_access_key_id="embedded", aws_secret_access_key="not-the-secret")
        yield S3Store.from_url(self.server.url(unique_prefix()) + "&max_attempts=1", session=session)
