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
        (torch.arange(32), random_kvcache(seq_len=16), ValueError, "seq_len 16 but tokens have 32"),
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
        ("s3://bucket/p?concurrency=0", "must be a positive integer"),
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


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"timeout": 0}, ValueError, "timeout must be a positive number"),
        ({"timeout": -1.5}, ValueError, "timeout"),
        ({"timeout": "5"}, ValueError, "timeout"),
        ({"timeout": float("inf")}, ValueError, "timeout"),
        ({"timeout": True}, ValueError, "timeout"),
        ({"strict": "yes"}, TypeError, "strict must be True or False"),
        ({"max_inflight": 0}, ValueError, "max_inflight must be a positive integer"),
        ({"max_inflight": 2.5}, ValueError, "max_inflight"),
        ({"retries": 3}, TypeError, "retries"),
    ],
)
def test_bad_vua_options(tmp_path, options: dict[str, object], error: type[Exception], message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        VUA(CFG, tmp_path, **options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("s3://bucket/p?max_attempts=0", "max_attempts"),
        ("s3://bucket/p?retry_mode=fast", "retry_mode"),
        ("s3://bucket/p?connect_timeout=0", "connect_timeout"),
        ("s3://bucket/p?read_timeout=-1", "read_timeout"),
        ("s3://bucket/p?multipart_threshold=lots", "multipart_threshold"),
        ("s3://bucket/p?concurrency=many", "concurrency"),
        ("s3://bucket/p?checksum=always", "checksum"),
        ("s3://bucket/p?strict=true", "unknown S3 setting 'strict'"),
        ("s3://bucket/p?timeout=5", "unknown S3 setting 'timeout'"),
        ("s3://bucket/p?Region=us-east-1", "unknown S3 setting 'Region'"),
        ("file:///tmp/x?concurrency=4", "no host or settings"),
    ],
)
def test_bad_url_settings_are_refused(location: str, message: str) -> None:
    with pytest.raises(InvalidLocationError, match=message):
        VUA(CFG, location)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"split_factor": True}, TypeError, "int"),
        ({"split_factor": "256"}, TypeError, "int"),
        ({"namespace": "x" * 129}, ValueError, "namespace"),
        ({"namespace": "-lead"}, ValueError, "namespace"),
        ({"namespace": 7}, ValueError, "namespace"),
    ],
)
def test_more_bad_config_values(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        VUAConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_salt_and_device_store_nothing(location: str) -> None:
    with VUA(CFG, location) as vua:
        for call in (
            lambda: vua.put(TOKENS, random_kvcache(seq_len=32), salt=5),  # type: ignore[arg-type]
            lambda: vua.get_closest(TOKENS, salt=b"tenant"),  # type: ignore[call-overload]
            lambda: vua.lookup(TOKENS, salt=["t"]),  # type: ignore[arg-type]
        ):
            with pytest.raises(TypeError, match="salt must be a string"):
                call()
        with pytest.raises(RuntimeError, match="device"):
            vua.get_closest(TOKENS, device="warp-drive")
    assert asyncio.run(listing(location)) == {}


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--tokens", "0"],
        ["demo", "--split-factor", "-16"],
        ["demo", "--model", "gpt-17"],
        ["demo", "--tokens", "many"],
        ["gc", "/tmp/x", "--older-than", "soon"],
        ["gc", "/tmp/x"],
        ["doctor"],
        ["stats"],
        ["frobnicate"],
    ],
)
def test_cli_rejects_bad_flags(argv: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    from vua_s3.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ls", "gs://bucket/p"], "unknown URL scheme 'gs'"),
        (["stats", "s3://bucket/p?colour=blue"], "unknown S3 setting 'colour'"),
        (["gc", "s3://AKIA:s3cr3tValue@bucket/p", "--older-than", "1d"], "credentials are not accepted"),
    ],
)
def test_cli_reports_bad_locations(argv: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    from vua_s3.cli.main import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("vua-s3: error:")
    assert "s3cr3tValue" not in err
