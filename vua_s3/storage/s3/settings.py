"""S3 settings: what a user can put in the query string of an ``s3://`` URL, and the client they make.

Settings come from the URL and the standard AWS chain, never credentials in the URL::

    s3://bucket/prefix?endpoint_url=https://vast.example:443&addressing=path&checksum=when_required
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import parse_qsl

from botocore.config import Config

from ...checks import positive_int, positive_seconds
from ...errors import InvalidLocationError
from ...units import parse_size

_SECRET_SETTINGS = {
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
    "sse_c_key",
    "sse_customer_key",
}
#: Where an SSE-C key is read from (base64 of 32 bytes); never from the URL.
SSE_C_KEY_ENV = "VUA_S3_SSE_C_KEY"
SSE_WRITES = ("PutObject", "CreateMultipartUpload")
SSE_C_OPERATIONS = (*SSE_WRITES, "UploadPart", "CompleteMultipartUpload", "GetObject", "HeadObject")
MIN_PART_SIZE = 5 << 20  # S3's smallest allowed multipart part (all but the last)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _parse_positive(text: str) -> int:
    return positive_int("the value", int(text))


def _parse_seconds(text: str) -> float:
    return positive_seconds("the value", float(text))


@dataclass(frozen=True)
class S3Settings:
    """Tunable S3 settings; each can be given in the URL query string by its name."""

    endpoint_url: str | None = None
    """Endpoint of a non-AWS system (VAST VIP pool, MinIO); AWS_ENDPOINT_URL also works."""
    region: str | None = None
    profile: str | None = None
    """Named AWS profile for credentials (a name, never the secret itself)."""
    addressing: str = "auto"
    """``path`` for VAST and most on-premises systems, ``virtual`` or ``auto`` for AWS."""
    checksum: str = "when_required"
    """``when_required`` sends and checks CRC checksums only where S3 demands them (works
    with every S3 system); ``when_supported`` is boto3's default since 1.36. Integrity of
    fragments is checked by vua_s3's own CRC either way."""
    verify: bool = True
    """Verify TLS certificates."""
    ca_bundle: str | None = None
    concurrency: int = 32
    """Requests in flight at once across the whole store (also the pool size)."""
    part_size: int = 16 << 20
    """Multipart part size and ranged-GET chunk size."""
    multipart_threshold: int = 128 << 20
    """Objects larger than this are uploaded in parts and read in ranges. Fragments already
    travel in parallel (one request each, ``max_inflight`` at once), so splitting them
    further only adds requests (``docs/performance.md``); objects of one KV head of one
    group stay far below it."""
    max_attempts: int = 5
    """Tries per request, the first included (as AWS_MAX_ATTEMPTS); 1 disables retries."""
    retry_mode: str = "standard"
    """botocore retry mode: ``standard`` (exponential backoff with jitter) or ``adaptive``
    (also slows the client down while the server throttles)."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    sse: str = "none"
    """Server-side encryption of new objects: ``sse-s3`` (AES256), ``sse-kms`` (with
    ``sse_kms_key_id`` or the bucket's default key) or ``sse-c`` (customer key, read
    from the environment variable ``VUA_S3_SSE_C_KEY``, base64; VAST and AWS)."""
    sse_kms_key_id: str | None = None
    transport: str = "auto"
    """Data path of object GETs and PUTs: ``crt`` (the AWS Common Runtime's C client),
    ``aiobotocore``, or ``auto``: crt when the settings allow it (no SSE, no proxy), else
    aiobotocore."""
    payload_signing: str = "auto"
    """``auto`` signs request bodies (SHA-256) over plain HTTP and sends UNSIGNED-PAYLOAD
    over HTTPS, where TLS protects the body; ``off`` never signs, for trusted plain-HTTP
    networks only; ``on`` always signs (``docs/storage.md``)."""
    upload_checksum: str = "auto"
    """``auto`` sends each single-request PUT's CRC-32C as ``x-amz-checksum-crc32c``, so a
    server that checks it refuses a body damaged on the way, and stops sending it if the
    endpoint refuses the header; ``crc32c`` always sends it; ``off`` never does."""

    @classmethod
    def from_query(cls, query: str) -> S3Settings:
        """Settings from a URL query string; unknown or malformed settings are errors."""
        settings = cls()
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name.lower() in _SECRET_SETTINGS:
                raise InvalidLocationError(
                    f"credentials ({name}) are not accepted in the URL: use AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY, a profile or an instance role"
                )
            parser = _SETTING_PARSERS.get(name)
            if parser is None:
                raise InvalidLocationError(
                    f"unknown S3 setting {name!r}; known settings: {', '.join(sorted(_SETTING_PARSERS))}"
                )
            try:
                settings = replace(settings, **{name: parser(value)})
            except ValueError as exc:
                raise InvalidLocationError(f"bad value for S3 setting {name!r}: {exc}") from None
        if settings.part_size < MIN_PART_SIZE:
            raise InvalidLocationError(f"part_size must be at least {MIN_PART_SIZE} bytes (an S3 limit)")
        if settings.sse_kms_key_id and settings.sse != "sse-kms":
            raise InvalidLocationError("sse_kms_key_id needs sse=sse-kms")
        if settings.transport == "crt":
            if not crt_installed():
                raise InvalidLocationError("transport=crt needs awscrt, a requirement of vua_s3: reinstall vua_s3")
            if settings.sse != "none":
                raise InvalidLocationError("transport=crt does not send SSE settings: use transport=aiobotocore")
        return settings

    def signs_payload(self) -> bool:
        """Whether request bodies are signed: ``auto`` signs over plain HTTP only."""
        if self.payload_signing != "auto":
            return self.payload_signing == "on"
        return not (self.endpoint_url or "https://").lower().startswith("https://")

    def client_kwargs(self, **config: Any) -> dict[str, Any]:
        """The arguments of a boto3/aioboto3 ``client("s3", ...)`` call for these settings; the one
        place a client is built from settings. ``config`` overrides botocore ``Config`` fields."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "verify": self.ca_bundle if self.ca_bundle and self.verify else self.verify,
            "config": self.botocore_config().merge(Config(**config)) if config else self.botocore_config(),
        }

    def botocore_config(self) -> Config:
        return Config(
            region_name=self.region,
            max_pool_connections=self.concurrency,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"total_max_attempts": self.max_attempts, "mode": self.retry_mode},
            s3={"addressing_style": self.addressing, "payload_signing_enabled": self.signs_payload()},
            request_checksum_calculation=self.checksum,
            response_checksum_validation=self.checksum,
        )


_SETTING_PARSERS: dict[str, Callable[[str], Any]] = {
    "endpoint_url": str,
    "region": str,
    "profile": str,
    "addressing": _parse_choice("auto", "path", "virtual"),
    "checksum": _parse_choice("when_required", "when_supported"),
    "verify": _parse_bool,
    "ca_bundle": str,
    "concurrency": _parse_positive,
    "part_size": parse_size,
    "multipart_threshold": parse_size,
    "max_attempts": _parse_positive,
    "retry_mode": _parse_choice("standard", "adaptive", "legacy"),
    "connect_timeout": _parse_seconds,
    "read_timeout": _parse_seconds,
    "sse": _parse_choice("none", "sse-s3", "sse-kms", "sse-c"),
    "sse_kms_key_id": str,
    "transport": _parse_choice("auto", "crt", "aiobotocore"),
    "payload_signing": _parse_choice("auto", "on", "off"),
    "upload_checksum": _parse_choice("auto", "crc32c", "off"),
}
assert set(_SETTING_PARSERS) == {f.name for f in fields(S3Settings)}


def sse_c_key() -> bytes:
    """The SSE-C key from the environment; errors never show the value."""
    text = os.environ.get(SSE_C_KEY_ENV, "")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise InvalidLocationError(
            f"sse=sse-c needs a 256-bit key, base64-encoded, in the environment variable {SSE_C_KEY_ENV}"
        )
    return key


def crt_installed() -> bool:
    """Whether awscrt's S3 client imports (it is a requirement; a broken install lacks it)."""
    try:
        import awscrt.s3  # noqa: F401
    except ImportError:
        return False
    return True
