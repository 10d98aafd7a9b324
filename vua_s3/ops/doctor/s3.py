"""The S3 doctor: every request vua_s3 makes, in the order a request path depends on them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import boto3
from awscrt.checksums import crc32c
from botocore.exceptions import BotoCoreError, ClientError, SSLError
from botocore.exceptions import ConnectionError as BotoConnectionError

from ... import logsafe
from ...storage import ObjectInfo
from ...storage.s3 import S3Store
from ...storage.s3.errors import CHECKSUM_REFUSALS, DENIED, NO_BUCKET, NOT_FOUND, PRECONDITION_FAILED, error_code
from ...storage.s3.upload import BAD_DIGEST, HEADER_REFUSED, checksum_header
from .common import FAIL, PASS, SKIP, WARN, Check, fragment_round_trip
from .refresh import refresh_check


def s3_checks(store: S3Store) -> list[Check]:
    """Check that ``store`` can hold a cache; every failure comes with its fix."""
    return _S3Doctor(store).run()


def _s3_client(store: S3Store, **config: Any) -> Any:
    """A plain boto3 client with the store's settings (``config`` overrides, e.g. another checksum mode)."""
    s = store.settings
    logsafe.install()
    return boto3.session.Session(profile_name=s.profile).client("s3", **s.client_kwargs(**config))


class _S3Doctor:
    """The S3 checks, in the order a request path depends on them."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.bucket = store.bucket
        self.key = f".vua-doctor/{uuid.uuid4().hex}"
        self.scratch = store.object_key(self.key)
        self.payload = os.urandom(64 << 10)
        self.checks: list[Check] = []

    def run(self) -> list[Check]:
        self._transport()
        if not self._credentials() or not self._bucket():
            return self._skip_rest()
        client = _s3_client(self.store)
        objects = f"arn:aws:s3:::{self.bucket}/{self.store.prefix}*"
        multipart_fix = "the endpoint refuses multipart uploads: set multipart_threshold above your fragment size"
        # (name, check, IAM action it needs, fix when the endpoint answers but misbehaves)
        steps: list[tuple[str, Callable[[Any], str], str, str]] = [
            ("put", self._put, "s3:PutObject", ""),
            ("head", self._head, "s3:GetObject", ""),
            ("get", self._get, "s3:GetObject", ""),
            (
                "ranged get",
                self._ranged,
                "s3:GetObject",
                "Range is ignored: set multipart_threshold above your fragments",
            ),
            ("multipart", self._multipart, "s3:PutObject", multipart_fix),
            ("conditional put", self._conditional, "s3:PutObject", ""),
            (
                "checksums",
                self._checksums,
                "s3:PutObject",
                "this endpoint rejects CRC32 checksums: add checksum=when_required",
            ),
            ("delete", self._delete, "s3:DeleteObject", ""),
        ]
        for name, step, action, fix in steps:
            if name in ("head", "get", "ranged get") and self.checks[-1].status in (FAIL, SKIP):
                self.checks.append(Check(name, SKIP, "needs an object: put failed"))
                continue
            try:
                detail = step(client)
            except (ClientError, BotoCoreError) as exc:
                self._fail(name, exc, f"grant {action} on {objects}", fix)
            else:
                status, detail = (WARN, detail[5:]) if detail.startswith("warn:") else (PASS, detail)
                self.checks.append(Check(name, status, detail, fix if status == WARN else ""))
        if any(c.name == "put" and c.status == FAIL for c in self.checks):
            self.checks.append(Check("upload checksum", SKIP, "needs a put"))
        else:
            try:
                self.checks.append(self._upload_checksum(client))
            except (ClientError, BotoCoreError) as exc:
                self._fail("upload checksum", exc, f"grant s3:PutObject on {objects}", "set upload_checksum=off")
        if all(c.status in (PASS, WARN) for c in self.checks if c.name in ("put", "get")):
            self.checks.append(asyncio.run(self._refresh(client)))
        else:
            self.checks.append(Check("refresh", SKIP, "needs put and get"))
        self._cleanup(client)
        if all(c.status in (PASS, WARN) for c in self.checks if c.name in ("put", "get", "delete")):
            fix = "grant s3:ListBucket on the bucket for the cache prefix: a lookup lists each group's objects"
            self.checks.append(asyncio.run(fragment_round_trip(self.store, denied_fix=fix)))
        else:
            self.checks.append(Check("fragments", SKIP, "needs put, get and delete"))
        return self.checks

    def _fail(self, name: str, exc: BaseException, permission: str, fix: str) -> None:
        """A failed check and the likeliest fix: a permission, the endpoint, the checksum mode."""
        code = error_code(exc)
        detail = f"{code}: {str(exc)[:160]}"
        if code in DENIED:
            detail, fix = f"refused ({code})", permission
        elif isinstance(exc, BotoConnectionError):
            fix = "the endpoint stopped answering: check it and run doctor again"
        elif self.store.settings.checksum == "when_supported" and code in CHECKSUM_REFUSALS:
            fix = "this endpoint rejects CRC32 checksums: add checksum=when_required"
        self.checks.append(Check(name, FAIL, detail, fix))

    def _skip_rest(self) -> list[Check]:
        names = (
            "put", "head", "get", "ranged get", "multipart", "conditional put", "checksums", "delete",
            "upload checksum", "refresh", "fragments",
        )  # fmt: skip
        for name in names:
            self.checks.append(Check(name, SKIP, "needs the checks above"))
        return self.checks

    def _transport(self) -> None:
        s = self.store.settings
        url = urlsplit(s.endpoint_url or "https://s3.amazonaws.com")
        if url.scheme == "https":
            if s.verify:
                detail = f"HTTPS, certificates verified{' with ' + s.ca_bundle if s.ca_bundle else ''}"
                self.checks.append(Check("tls", PASS, detail))
            else:
                self.checks.append(
                    Check("tls", WARN, "HTTPS without certificate checks (verify=false)", "use ca_bundle=/path/ca.pem")
                )
            return
        try:
            loopback = ipaddress.ip_address(url.hostname or "").is_loopback
        except ValueError:
            loopback = url.hostname == "localhost"
        if loopback:
            self.checks.append(Check("tls", PASS, "plain HTTP on loopback"))
        else:
            self.checks.append(
                Check(
                    "tls",
                    WARN,
                    "plain HTTP: KV data and requests cross the network unencrypted",
                    "use an https:// endpoint_url",
                )
            )

    def _credentials(self) -> bool:
        try:
            creds = boto3.session.Session(profile_name=self.store.settings.profile).get_credentials()
        except BotoCoreError as exc:
            self.checks.append(Check("credentials", FAIL, type(exc).__name__, "check the profile name and its file"))
            return False
        if creds is None:
            self.checks.append(
                Check(
                    "credentials",
                    FAIL,
                    "none found in the AWS chain",
                    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE (or profile=NAME), or use a role",
                )
            )
            return False
        self.checks.append(Check("credentials", PASS, f"found ({creds.method})"))
        return True

    def _bucket(self) -> bool:
        client = _s3_client(self.store)
        try:
            client.head_bucket(Bucket=self.bucket)
        except SSLError as exc:
            self.checks.append(
                Check(
                    "bucket",
                    FAIL,
                    f"TLS failed: {str(exc)[:120]}",
                    "if the endpoint uses a private CA, add ca_bundle=/path/ca.pem",
                )
            )
            return False
        except BotoConnectionError as exc:
            self.checks.append(
                Check("bucket", FAIL, f"cannot connect: {str(exc)[:120]}", "check endpoint_url and the network")
            )
            return False
        except ClientError as exc:
            code = error_code(exc)
            if code in NOT_FOUND | NO_BUCKET:
                fix = f"create bucket {self.bucket!r} or correct its name"
            elif code in DENIED:
                fix = f"grant s3:ListBucket on arn:aws:s3:::{self.bucket}, or check the credentials"
            elif code in ("301", "PermanentRedirect", "400"):
                fix = "set region= to the bucket's region (or addressing=path for on-premises systems)"
            else:
                fix = ""
            self.checks.append(Check("bucket", FAIL, f"head_bucket {self.bucket!r}: {code}", fix))
            return False
        self.checks.append(Check("bucket", PASS, f"{self.bucket!r} reachable at {self.store.endpoint()}"))
        return True

    def _put(self, client: Any) -> str:
        client.put_object(Bucket=self.bucket, Key=self.scratch, Body=self.payload, **self.store.sse_params("PutObject"))
        return f"{len(self.payload)} bytes to {self.scratch}"

    def _head(self, client: Any) -> str:
        head = client.head_object(Bucket=self.bucket, Key=self.scratch, **self.store.sse_params("HeadObject"))
        if head["ContentLength"] != len(self.payload):
            return f"warn:size {head['ContentLength']}, expected {len(self.payload)}"
        encryption = head.get("ServerSideEncryption") or ("SSE-C" if head.get("SSECustomerAlgorithm") else "")
        return f"size matches{', encrypted ' + encryption if encryption else ''}"

    def _get(self, client: Any) -> str:
        body = client.get_object(Bucket=self.bucket, Key=self.scratch, **self.store.sse_params("GetObject"))["Body"]
        if body.read() != self.payload:
            return "warn:content differs from what was written"
        return "content matches"

    def _ranged(self, client: Any) -> str:
        response = client.get_object(
            Bucket=self.bucket, Key=self.scratch, Range="bytes=1000-1999", **self.store.sse_params("GetObject")
        )
        if response["Body"].read() != self.payload[1000:2000]:
            return "warn:the endpoint ignored the Range header"
        return "bytes 1000-1999 match"

    def _multipart(self, client: Any) -> str:
        key = self.scratch + "-multipart"
        created = client.create_multipart_upload(
            Bucket=self.bucket, Key=key, **self.store.sse_params("CreateMultipartUpload")
        )
        upload_id = created["UploadId"]
        try:
            part = client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=1,
                Body=self.payload,
                **self.store.sse_params("UploadPart"),
            )
            client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
                **self.store.sse_params("CompleteMultipartUpload"),
            )
        except BaseException:
            client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
        body = client.get_object(Bucket=self.bucket, Key=key, **self.store.sse_params("GetObject"))["Body"].read()
        return "create, upload, complete, read back" if body == self.payload else "warn:content differs"

    def _conditional(self, client: Any) -> str:
        try:
            client.put_object(
                Bucket=self.bucket, Key=self.scratch, Body=b"x", IfNoneMatch="*", **self.store.sse_params("PutObject")
            )
        except ClientError as exc:
            if error_code(exc) in PRECONDITION_FAILED:
                return "If-None-Match honoured (not needed by vua_s3)"
            return f"warn:If-None-Match refused ({error_code(exc)}); vua_s3 does not need it"
        client.put_object(Bucket=self.bucket, Key=self.scratch, Body=self.payload, **self.store.sse_params("PutObject"))
        return "warn:If-None-Match ignored (overwrote an existing key); vua_s3 does not need it"

    def _checksums(self, client: Any) -> str:
        """boto3 >= 1.36 sends CRC32 checksums by default; some S3 systems refuse them."""
        probe = _s3_client(
            self.store, request_checksum_calculation="when_supported", response_checksum_validation="when_supported"
        )
        key = self.scratch + "-checksum"
        try:
            probe.put_object(Bucket=self.bucket, Key=key, Body=self.payload, **self.store.sse_params("PutObject"))
            probe.get_object(Bucket=self.bucket, Key=key, **self.store.sse_params("GetObject"))["Body"].read()
        except ClientError as exc:
            if self.store.settings.checksum == "when_supported":
                raise
            return f"warn:default CRC32 checksums refused ({error_code(exc)}); keep checksum=when_required (set)"
        finally:
            client.delete_object(Bucket=self.bucket, Key=key)
        return f"CRC32 checksum headers accepted (checksum={self.store.settings.checksum} in use)"

    def _upload_checksum(self, client: Any) -> Check:
        """Whether the endpoint takes ``x-amz-checksum-crc32c`` and checks it (a wrong one is
        refused): which ``upload_checksum`` and ``payload_signing`` fit."""
        s, key, sse = self.store.settings, self.scratch + "-crc32c", self.store.sse_params("PutObject")
        crc = crc32c(self.payload)
        name = "upload checksum"
        try:
            client.put_object(
                Bucket=self.bucket, Key=key, Body=self.payload, ChecksumCRC32C=checksum_header(crc), **sse
            )
        except ClientError as exc:
            if error_code(exc) not in HEADER_REFUSED:
                raise
            detail = f"x-amz-checksum-crc32c refused ({error_code(exc)})"
            fix = "set upload_checksum=off (auto also stops sending it after the first refused put)"
            return Check(name, WARN, detail, fix if s.upload_checksum != "off" else "")
        once = _s3_client(self.store, retries={"total_max_attempts": 1})
        try:
            once.put_object(
                Bucket=self.bucket, Key=key, Body=self.payload, ChecksumCRC32C=checksum_header(crc ^ 1), **sse
            )
        except ClientError as exc:
            if error_code(exc) != BAD_DIGEST:
                raise
        else:
            detail = "x-amz-checksum-crc32c accepted but not checked (a wrong one was stored)"
            fix = "damaged uploads are caught only when read: over plain HTTP keep payload_signing=auto (signed)"
            return Check(name, WARN, detail, fix)
        detail = "x-amz-checksum-crc32c accepted and checked: a damaged upload is refused"
        if s.upload_checksum == "off":
            return Check(name, WARN, detail + " (upload_checksum=off sends none)", "set upload_checksum=auto")
        if not s.signs_payload() or urlsplit(s.endpoint_url or "https://").scheme == "https":
            return Check(name, PASS, f"{detail} (upload_checksum={s.upload_checksum})")
        return Check(name, PASS, f"{detail}; on a trusted network payload_signing=off saves the body's SHA-256")

    def _delete(self, client: Any) -> str:
        for key in (self.scratch, self.scratch + "-multipart"):
            client.delete_object(Bucket=self.bucket, Key=key)
        try:
            client.head_object(Bucket=self.bucket, Key=self.scratch, **self.store.sse_params("HeadObject"))
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                return "scratch objects removed"
            raise
        return "warn:the object is still there after DELETE"

    async def _refresh(self, client: Any) -> Check:
        """What ``refresh_after`` needs: a copy onto itself that moves last-modified (a second
        or two of waiting: S3 counts whole seconds) and keeps encryption, ETag and checksum."""

        async def age(info: ObjectInfo) -> None:
            await asyncio.sleep(max(0.0, info.last_modified + 2 - time.time()))

        def describe(key: str) -> dict[str, Any]:
            head = client.head_object(
                Bucket=self.bucket, Key=self.store.object_key(key), ChecksumMode="ENABLED",
                **self.store.sse_params("HeadObject"),
            )  # fmt: skip
            kept = ("ETag", "ServerSideEncryption", "SSEKMSKeyId", "SSECustomerAlgorithm", "Metadata")
            return {name: value for name, value in head.items() if name in kept or name.startswith("Checksum")}

        objects = f"arn:aws:s3:::{self.bucket}/{self.store.prefix}*"
        fix = f"grant s3:GetObject and s3:PutObject on {objects} (a refresh is a CopyObject)"
        try:
            return await refresh_check(self.store, self.key + "-refresh", age, describe, denied_fix=fix)
        finally:
            await self.store.close()

    def _cleanup(self, client: Any) -> None:
        """Scratch keys go even when a check failed half-way."""
        scratch = [self.scratch + suffix for suffix in ("", "-multipart", "-checksum", "-crc32c", "-refresh")]
        for key in scratch:
            with contextlib.suppress(ClientError, BotoCoreError):  # the failed check already says why
                client.delete_object(Bucket=self.bucket, Key=key)
