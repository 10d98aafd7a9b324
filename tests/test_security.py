"""Secrets stay secret, TLS is checked, encryption settings reach the server, files stay private."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import logging
import os
import re
import ssl
import stat
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache, unique_prefix

from vua_s3 import VUA, AccessDeniedError, InvalidLocationError, StoreError, VUAConfig, open_store
from vua_s3.logsafe import redact
from vua_s3.storage.posix import DIR_MODE, FILE_MODE
from vua_s3.storage.s3.settings import SSE_C_KEY_ENV, S3Settings
from vua_s3.testing.faultproxy import Fault, FaultProxy
from vua_s3.testing.moto import EmbeddedS3

CFG = VUAConfig(split_factor=16)
TOKENS = torch.arange(64)
KV = random_kvcache(seq_len=64)
KEY_ID = "AKIA" + "VUATESTKEYID0001"  # a made-up key id, split so scanners see no credential
SECRET = "vUaT3stS3cretKey/DoNotLeak+0123456789abcd"
SSE_C_KEY = bytes(range(100, 132))
SERVER_LOGGERS = ("moto", "werkzeug")  # the S3 server, in this process only because it is a test


@pytest.fixture
def proxy(moto_server: EmbeddedS3) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.port) as px:
        yield px


def via(server: EmbeddedS3, proxy: FaultProxy, prefix: str, extra: str = "") -> str:
    return f"s3://{server.bucket}/{prefix}?endpoint_url={proxy.endpoint_url}&region=us-east-1&addressing=path{extra}"


def leaks(text: str) -> list[str]:
    """The secrets (or their encodings) that ``text`` shows."""
    found = [name for name, value in (("access key id", KEY_ID), ("secret key", SECRET)) if value in text]
    if base64.b64encode(SSE_C_KEY).decode() in text or repr(SSE_C_KEY) in text:
        found.append("SSE-C key")
    if re.search(r"Signature[=:]\s*[0-9a-f]{16,}", text):
        found.append("request signature")
    return found


def test_debug_logs_and_errors_hold_no_secrets(moto_server, proxy, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """Every logger at DEBUG (botocore's included) through puts, reads, a 403 and an outage."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv(SSE_C_KEY_ENV, base64.b64encode(SSE_C_KEY).decode())
    url = via(moto_server, proxy, unique_prefix(), "&sse=sse-c&max_attempts=1")
    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG)
    with VUA(CFG, url) as vua:
        vua.put(TOKENS, KV)
        res = vua.get_closest(TOKENS)
        assert res is not None
        assert_kv_equal(res.data, KV)
        proxy.faults = [Fault("status", method="GET", status=403, code="AccessDenied")]
        with pytest.raises(AccessDeniedError) as denied:
            vua.get_closest(TOKENS)
        errors.append(denied.value)
        proxy.down()
        assert vua.lookup(TOKENS) == 0
        with pytest.raises(StoreError) as down:
            vua.put(torch.arange(100, 164), KV)
        errors.append(down.value)
        proxy.up()
    client_records = [r for r in caplog.records if not r.name.startswith(SERVER_LOGGERS)]
    assert any(r.name.startswith("botocore") and r.levelno == logging.DEBUG for r in client_records)
    assert any("Signature=***" in r.getMessage() for r in client_records)  # the filter did its work
    for record in client_records:
        assert leaks(record.getMessage()) == [], (record.name, record.getMessage()[:300])
    for exc in errors:
        text = "".join(traceback.format_exception(exc))
        assert leaks(text) == [], text
    assert any("x-amz-server-side-encryption-customer-key" in r.headers for r in proxy.requests)


def test_redact() -> None:
    line = (
        "{'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAX/20260101/us-east-1/s3/aws4_request, "
        "SignedHeaders=host, Signature=" + "ab" * 32 + "', 'x-amz-server-side-encryption-customer-key': "
        "'c2VjcmV0c2VjcmV0c2VjcmV0', 'X-Amz-Security-Token': b'FwoGZXIvYXdzE'}"
    )
    clean = redact(line)
    for secret in ("AKIAX", "ab" * 32, "c2VjcmV0c2VjcmV0c2VjcmV0", "FwoGZXIvYXdzE"):
        assert secret not in clean
    assert "SignedHeaders=host" in clean


def test_cli_verbose_shows_no_secrets(moto_server, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from vua_s3.cli.main import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert main(["-v", "doctor", moto_server.url(unique_prefix())]) == 0
    assert main(["-v", "stats", moto_server.url(unique_prefix())]) == 0
    captured = capsys.readouterr()
    assert leaks(captured.out + captured.err) == []


def test_credentials_come_from_a_profile(moto_server, proxy, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """No keys in the environment: the named profile in the shared credentials file is used."""
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[cache-writer]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with VUA(CFG, via(moto_server, proxy, unique_prefix(), "&profile=cache-writer")) as vua:
        assert vua.put(TOKENS, KV) == 4
    signed = [r.headers["authorization"] for r in proxy.requests if "authorization" in r.headers]
    assert signed and all(f"Credential={KEY_ID}/" in h for h in signed)
    with pytest.raises(InvalidLocationError, match="credentials") as refused:
        open_store(f"s3://bucket/p?aws_secret_access_key={SECRET}")
    assert SECRET not in str(refused.value)


# --- TLS ---------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A throwaway certificate for 127.0.0.1 and a server context that presents it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vua-s3 test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path


def test_tls_is_verified_by_default_and_ca_bundle_works(moto_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert S3Settings().verify is True
    context, ca = self_signed(tmp_path)
    with FaultProxy(moto_server.port, tls=context) as tls_proxy:
        url = via(moto_server, tls_proxy, unique_prefix(), "&max_attempts=1")
        # An unverifiable certificate is a configuration error, not an outage: it raises.
        with VUA(CFG, url) as vua, pytest.raises(StoreError, match=r"TLS failed.*set ca_bundle=/path/to/ca\.pem"):
            vua.lookup(TOKENS)
        with VUA(CFG, url + f"&ca_bundle={ca}") as vua:
            assert vua.put(TOKENS, KV) == 4
            assert vua.lookup(TOKENS) == 64
        with VUA(CFG, url + "&verify=false") as vua:
            assert vua.lookup(TOKENS) == 64


# --- server-side encryption --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "headers", "head_fields"),
    [
        ("&sse=sse-s3", {"x-amz-server-side-encryption": "AES256"}, {"ServerSideEncryption": "AES256"}),
        (
            "&sse=sse-kms&sse_kms_key_id=alias/kv-cache",
            {
                "x-amz-server-side-encryption": "aws:kms",
                "x-amz-server-side-encryption-aws-kms-key-id": "alias/kv-cache",
            },
            {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/kv-cache"},
        ),
    ],
    ids=["sse-s3", "sse-kms"],
)
def test_sse_settings_reach_the_server(moto_server, proxy, extra, headers, head_fields) -> None:  # type: ignore[no-untyped-def]
    prefix = unique_prefix()
    with VUA(CFG, via(moto_server, proxy, prefix, extra)) as vua:
        vua.put(TOKENS, KV)
        assert vua.get_closest(TOKENS) is not None
    puts = [r for r in proxy.requests if r.method == "PUT"]
    assert len(puts) == 8  # 4 groups x 2 KV heads
    for request in puts:
        assert {name: request.headers.get(name) for name in headers} == headers
    head = moto_server.client().head_object(Bucket=moto_server.bucket, Key=f"{prefix}/{CFG.tokens_to_paths(TOKENS)[0]}")
    assert {name: head.get(name) for name in head_fields} == head_fields


def test_sse_c_key_goes_with_every_data_request(moto_server, proxy, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """SSE-C (VAST, AWS): the key from the environment on every PUT, part, HEAD and GET.
    moto stores no SSE-C state, so what is checked is what the server is sent."""
    monkeypatch.setenv(SSE_C_KEY_ENV, base64.b64encode(SSE_C_KEY).decode())
    big = VUAConfig(split_factor=256)
    tokens = torch.arange(256)
    kv = random_kvcache(layers=48, seq_len=256, heads=1, head_dim=128, dtype=torch.float32)  # one 12 MiB object
    url = via(moto_server, proxy, unique_prefix(), "&sse=sse-c&multipart_threshold=5MiB&part_size=5MiB")
    with VUA(big, url) as vua:
        vua.put(tokens, kv)
        res = vua.get_closest(tokens)
    assert res is not None
    assert_kv_equal(res.data, kv)
    data_requests = [r for r in proxy.requests if "/t-" in r.path and r.method != "DELETE"]
    assert {r.method for r in data_requests} == {"HEAD", "POST", "PUT", "GET"}
    digest = base64.b64encode(hashlib.md5(SSE_C_KEY).digest()).decode()
    for request in data_requests:
        assert request.headers.get("x-amz-server-side-encryption-customer-algorithm") == "AES256", request
        assert request.headers.get("x-amz-server-side-encryption-customer-key-md5") == digest


@pytest.mark.parametrize(
    ("url", "env", "message"),
    [
        ("s3://b/p?sse=sse-c", None, SSE_C_KEY_ENV),
        ("s3://b/p?sse=sse-c", "bm90LWEta2V5", SSE_C_KEY_ENV),
        ("s3://b/p?sse=sse-c", "%%%not base64%%%", SSE_C_KEY_ENV),
        ("s3://b/p?sse_c_key=c2VjcmV0", None, "not accepted in the URL"),
        ("s3://b/p?sse=aes", None, "sse"),
        ("s3://b/p?sse_kms_key_id=alias/x", None, "needs sse=sse-kms"),
    ],
)
def test_bad_sse_settings(monkeypatch, url: str, env: str | None, message: str) -> None:  # type: ignore[no-untyped-def]
    if env is None:
        monkeypatch.delenv(SSE_C_KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(SSE_C_KEY_ENV, env)
    with pytest.raises(InvalidLocationError, match=message) as info:
        open_store(url)
    assert "bm90LWEta2V5" not in str(info.value) and "c2VjcmV0" not in str(info.value)


# --- POSIX ---------------------------------------------------------------------------------------


def test_posix_files_are_private_whatever_the_umask(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old = os.umask(0)
    try:
        with VUA(CFG, tmp_path / "cache") as vua:
            vua.put(TOKENS, KV)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(files) == 8  # 4 groups x 2 KV heads
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {FILE_MODE}
    dirs = [p for p in (tmp_path / "cache").rglob("*") if p.is_dir()]
    assert dirs and all(stat.S_IMODE(p.stat().st_mode) & ~DIR_MODE == 0 for p in dirs)
    assert not any(stat.S_IMODE(p.stat().st_mode) & stat.S_IWOTH for p in [*files, *dirs])


@pytest.mark.parametrize("key", ["../outside", "/etc/passwd", "a/../../b", "a//b", "a/./b", "", "a\\..\\b", "a\0b"])
def test_posix_keys_never_leave_the_root(tmp_path, key: str) -> None:  # type: ignore[no-untyped-def]
    store = open_store(str(tmp_path / "root"))

    async def attempt() -> None:
        for operation in (store.put(key, b"x"), store.get(key), store.head_many([key]), store.delete(key)):
            with pytest.raises(ValueError, match="invalid key"):
                await operation

    asyncio.run(attempt())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
