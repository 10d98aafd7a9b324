"""Bad input gets a clear error naming the problem, and nothing stored changes."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import random_kvcache

from vua_s3 import VUA, InvalidLocationError, SplitFactorError, StoreError, VUAConfig, open_store

CFG = VUAConfig(split_factor=16)
TOKENS = torch.arange(32)


async def listing(location: str) -> dict[str, int]:
    store = open_store(location)
    try:
        return {i.key: i.size async for i in store.list()}
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("tokens", "kvcache", "error", "message"),
    [
        (torch.zeros(1, 1, 32, dtype=torch.long), random_kvcache(seq_len=32), ValueError, "shape"),
        (torch.rand(32), random_kvcache(seq_len=32), TypeError, "integer token ids"),
        (torch.arange(30), random_kvcache(seq_len=30), SplitFactorError, "not a multiple of split_factor=16"),
        (torch.arange(32), random_kvcache(seq_len=48), ValueError, "seq_len 48 but tokens have 32"),
        (torch.arange(32), random_kvcache(seq_len=32, batch=2), ValueError, "batch 2 but tokens have 1"),
        (torch.arange(0), random_kvcache(seq_len=0), ValueError, "empty"),
        (torch.arange(32) - 5, random_kvcache(seq_len=32), ValueError, "non-negative"),
        (torch.arange(32), [], TypeError, "non-empty list"),
        (torch.arange(32), [(torch.zeros(1, 2, 32, 8),)], TypeError, r"kvcache\[0\] must be a \(K, V\) pair"),
        (torch.arange(32), [(torch.zeros(2, 32, 8), torch.zeros(2, 32, 8))], ValueError, "batch, heads, seq_len"),
        (
            torch.arange(32),
            [*random_kvcache(seq_len=32), (torch.zeros(1, 2, 32, 4), torch.zeros(1, 2, 32, 4))],
            ValueError,
            "must match",
        ),
        (torch.arange(32), random_kvcache(seq_len=32, dtype=torch.complex64), TypeError, "cannot be stored"),
    ],
    ids=[
        "3d-tokens",
        "float-tokens",
        "not-split-multiple",
        "seq-len-mismatch",
        "batch-mismatch",
        "empty",
        "negative-ids",
        "empty-kvcache",
        "not-a-pair",
        "3d-kv",
        "layers-disagree",
        "complex-dtype",
    ],
)
def test_put_rejects_bad_input_and_stores_nothing(location: str, tokens, kvcache, error, message: str) -> None:  # type: ignore[no-untyped-def]
    with VUA(CFG, location) as vua:
        vua.put(TOKENS, random_kvcache(seq_len=32))
        before = asyncio.run(listing(location))
        with pytest.raises(error, match=message):
            vua.put(tokens, kvcache)
        assert asyncio.run(listing(location)) == before


@pytest.mark.parametrize(
    ("tokens", "error", "message"),
    [
        (torch.zeros(2, 32, dtype=torch.long), ValueError, r"\[n\] or \[1, n\]"),
        (torch.rand(32), TypeError, "integer token ids"),
        (torch.arange(0), ValueError, "empty"),
        ([torch.arange(32), "oops"], TypeError, "list of tensors"),
    ],
)
def test_get_closest_and_lookup_reject_bad_tokens(location: str, tokens, error, message: str) -> None:  # type: ignore[no-untyped-def]
    with VUA(CFG, location) as vua:
        with pytest.raises(error, match=message):
            vua.get_closest(tokens)
        if isinstance(tokens, torch.Tensor):
            with pytest.raises(error, match=message):
                vua.lookup(tokens)


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("gs://bucket/prefix", "unknown URL scheme 'gs'"),
        ("s3://AKIAEXAMPLE:s3cr3tValue@bucket/prefix", "credentials are not accepted"),
        ("s3://bucket/p?aws_secret_access_key=s3cr3tValue", "credentials"),
        ("s3:///prefix", "no bucket"),
        ("s3://bucket/p?colour=blue", "unknown S3 setting 'colour'"),
        ("s3://bucket/p?concurrency=0", "must be positive"),
        ("s3://bucket/p?addressing=sideways", "addressing"),
        ("s3://bucket/p?part_size=1MiB", "at least"),
        ("s3://bucket/p?verify=maybe", "not a boolean"),
        ("file://host/path", "no host"),
        ("", "non-empty"),
    ],
)
def test_bad_locations_are_refused_clearly(location: str, message: str) -> None:
    with pytest.raises(InvalidLocationError, match=message) as info:
        VUA(CFG, location)
    assert "s3cr3tValue" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split_factor": 0}, "positive"),
        ({"split_factor": -16}, "positive"),
        ({"split_factor": 16.0}, "int"),
        ({"namespace": "a/b"}, "namespace"),
        ({"namespace": ""}, "namespace"),
        ({"namespace": "../up"}, "namespace"),
    ],
)
def test_bad_config_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        VUAConfig(**kwargs)  # type: ignore[arg-type]


def test_missing_bucket_is_an_error_not_a_miss(moto_server) -> None:  # type: ignore[no-untyped-def]
    url = moto_server.url("p").replace(f"s3://{moto_server.bucket}/", "s3://no-such-bucket/")
    with VUA(CFG, url) as vua:
        with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
            vua.lookup(TOKENS)
        with pytest.raises(StoreError, match="no-such-bucket"):
            vua.put(TOKENS, random_kvcache(seq_len=32))


def test_posix_keys_cannot_escape_the_root(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = open_store(str(tmp_path / "root"))
    for key in ("../outside", "/etc/passwd", "a/../../b", "a//b", ""):
        with pytest.raises(ValueError, match="invalid key"):
            asyncio.run(store.put(key, b"x"))
    assert not (tmp_path / "outside").exists()
