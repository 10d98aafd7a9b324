"""Operations on a store: ``doctor`` (can this endpoint hold a cache?) and ``gc`` (expire old fragments).

Both work from a location URL, as a user types it. ``doctor`` tries every request
vua_s3 makes, on a scratch key under the store's prefix, and says how to fix each
failure. ``gc`` deletes fragments older than a cutoff; it only touches keys of the
fragment layout, and re-checks each one right before deleting it, so it is safe while
other clients read and write (a race costs a cache miss, never wrong data).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, SSLError
from botocore.exceptions import ConnectionError as BotoConnectionError

from . import logsafe
from .errors import InvalidLocationError
from .loop import gather_or_cancel
from .posix import FILE_MODE, PosixStore
from .s3 import S3Store
from .store import ObjectInfo, Store, open_store

_FRAGMENT_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}/[0-9a-f]{2}/[0-9a-f]{64}\.safetensors$")
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_GC_BATCH = 256

PASS, WARN, FAIL, SKIP = "pass", "warn", "FAIL", "skip"
# How S3 systems answer a checksum header they do not support.
_CHECKSUM_REFUSALS = {
    "400",
    "InvalidArgument",
    "InvalidRequest",
    "NotImplemented",
    "BadDigest",
    "XAmzContentSHA256Mismatch",
}


def parse_age(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` -> seconds."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not an age: use a number and a unit s, m, h, d or w (e.g. 7d)")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


# --- doctor ----------------------------------------------------------------------------------


@dataclass
class Check:
    """One line of the doctor's table."""

    name: str
    status: str
    detail: str
    fix: str = ""


def doctor(location: str) -> list[Check]:
    """Check that ``location`` can hold a cache; every failure comes with its fix."""
    try:
        store = open_store(location)
    except (InvalidLocationError, ValueError) as exc:
        return [Check("location", FAIL, str(exc), "correct the URL (see `vua-s3 doctor --help`)")]
    if isinstance(store, S3Store):
        return _S3Doctor(store).run()
    assert isinstance(store, PosixStore)
    return asyncio.run(_posix_doctor(store))


def format_checks(checks: list[Check]) -> str:
    """The doctor's table: one row per check, then the fixes for what failed."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail"]
    lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in checks]
    fixes = [c for c in checks if c.fix and c.status in (FAIL, WARN)]
    if fixes:
        lines.append("")
        lines += [f"fix {c.name}: {c.fix}" for c in fixes]
    return "\n".join(lines)


def _s3_client(store: S3Store, *, checksum: str | None = None) -> Any:
    """A plain boto3 client with the store's settings (and, for one probe, another checksum mode)."""
    s = store.settings
    logsafe.install()
    config = s.botocore_config()
    if checksum is not None:
        config = config.merge(Config(request_checksum_calculation=checksum, response_checksum_validation=checksum))
    return boto3.session.Session(profile_name=s.profile).client(
        "s3",
        endpoint_url=s.endpoint_url,
        region_name=s.region,
        verify=s.ca_bundle if s.ca_bundle and s.verify else s.verify,
        config=config,
    )


def _code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return type(exc).__name__


class _S3Doctor:
    """The S3 checks, in the order a request path depends on them."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.bucket = store.bucket
        self.scratch = store._object_key(f".vua-doctor/{uuid.uuid4().hex}")
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
        self._cleanup(client)
        return self.checks

    def _fail(self, name: str, exc: BaseException, permission: str, fix: str) -> None:
        """A failed check and the likeliest fix: a permission, the endpoint, the checksum mode."""
        code = _code(exc)
        detail = f"{code}: {str(exc)[:160]}"
        if code in ("403", "AccessDenied"):
            detail, fix = f"refused ({code})", permission
        elif isinstance(exc, BotoConnectionError):
            fix = "the endpoint stopped answering: check it and run doctor again"
        elif self.store.settings.checksum == "when_supported" and code in _CHECKSUM_REFUSALS:
            fix = "this endpoint rejects CRC32 checksums: add checksum=when_required"
        self.checks.append(Check(name, FAIL, detail, fix))

    def _skip_rest(self) -> list[Check]:
        for name in ("put", "head", "get", "ranged get", "multipart", "conditional put", "checksums", "delete"):
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
            code = _code(exc)
            if code in ("404", "NoSuchBucket"):
                fix = f"create bucket {self.bucket!r} or correct its name"
            elif code in ("403", "AccessDenied"):
                fix = f"grant s3:ListBucket on arn:aws:s3:::{self.bucket}, or check the credentials"
            elif code in ("301", "PermanentRedirect", "400"):
                fix = "set region= to the bucket's region (or addressing=path for on-premises systems)"
            else:
                fix = ""
            self.checks.append(Check("bucket", FAIL, f"head_bucket {self.bucket!r}: {code}", fix))
            return False
        self.checks.append(Check("bucket", PASS, f"{self.bucket!r} reachable at {self.store._endpoint()}"))
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
            if _code(exc) in ("PreconditionFailed", "412"):
                return "If-None-Match honoured (not needed by vua_s3)"
            return f"warn:If-None-Match refused ({_code(exc)}); vua_s3 does not need it"
        client.put_object(Bucket=self.bucket, Key=self.scratch, Body=self.payload, **self.store.sse_params("PutObject"))
        return "warn:If-None-Match ignored (overwrote an existing key); vua_s3 does not need it"

    def _checksums(self, client: Any) -> str:
        """boto3 >= 1.36 sends CRC32 checksums by default; some S3 systems refuse them."""
        probe = _s3_client(self.store, checksum="when_supported")
        key = self.scratch + "-checksum"
        try:
            probe.put_object(Bucket=self.bucket, Key=key, Body=self.payload, **self.store.sse_params("PutObject"))
            probe.get_object(Bucket=self.bucket, Key=key, **self.store.sse_params("GetObject"))["Body"].read()
        except ClientError as exc:
            if self.store.settings.checksum == "when_supported":
                raise
            return f"warn:default CRC32 checksums refused ({_code(exc)}); keep checksum=when_required (set)"
        finally:
            client.delete_object(Bucket=self.bucket, Key=key)
        return f"CRC32 checksum headers accepted (checksum={self.store.settings.checksum} in use)"

    def _delete(self, client: Any) -> str:
        for key in (self.scratch, self.scratch + "-multipart"):
            client.delete_object(Bucket=self.bucket, Key=key)
        try:
            client.head_object(Bucket=self.bucket, Key=self.scratch, **self.store.sse_params("HeadObject"))
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return "scratch objects removed"
            raise
        return "warn:the object is still there after DELETE"

    def _cleanup(self, client: Any) -> None:
        """Scratch keys go even when a check failed half-way."""
        for key in (self.scratch, self.scratch + "-multipart", self.scratch + "-checksum"):
            with contextlib.suppress(ClientError, BotoCoreError):  # the failed check already says why
                client.delete_object(Bucket=self.bucket, Key=key)


async def _posix_doctor(store: PosixStore) -> list[Check]:
    checks = [Check("directory", PASS, str(store.root))]
    key = f".vua-doctor/{uuid.uuid4().hex}"
    payload = os.urandom(64 << 10)
    try:
        await store.put(key, payload)
        mode = os.stat(store.root / key).st_mode & 0o777
        checks.append(Check("put", PASS, f"{len(payload)} bytes, mode {mode:o}"))
        if mode != FILE_MODE:
            checks.append(Check("file mode", WARN, f"{mode:o}, expected {FILE_MODE:o}", "check the umask or ACLs"))
        same = await store.get(key) == payload
        checks.append(Check("get", PASS if same else FAIL, "content matches" if same else "content differs"))
        await store.delete(key)
        checks.append(Check("delete", PASS, "scratch file removed"))
    except Exception as exc:
        checks.append(Check("access", FAIL, str(exc), f"let this user create files under {store.root}"))
    finally:
        with contextlib.suppress(Exception):
            await store.delete(key)
            (store.root / ".vua-doctor").rmdir()
    usage = os.statvfs(store.root)
    free = usage.f_bavail * usage.f_frsize
    checks.append(Check("free space", PASS if free > 1 << 30 else WARN, f"{free / (1 << 30):.1f} GiB", "free space"))
    return checks


# --- gc --------------------------------------------------------------------------------------


@dataclass
class GcReport:
    """What a gc run found and did (``dry_run``: what it would have done)."""

    scanned: int = 0
    expired: int = 0
    deleted: int = 0
    bytes_freed: int = 0
    skipped_foreign: int = 0
    """Objects under the prefix that are not fragments: never touched."""
    uploads_aborted: int = 0
    dry_run: bool = False


Progress = Callable[[int, int], None]


async def gc(
    location: str | Store,
    older_than: float,
    *,
    namespace: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: float | None = None,
) -> GcReport:
    """Delete fragments last modified more than ``older_than`` seconds ago.

    S3 uses LastModified, POSIX the file mtime. Only keys of the fragment layout are
    touched. Each candidate is probed again right before its batch is deleted, so a
    fragment rewritten meanwhile by another client is kept. On S3, incomplete
    multipart uploads started before the cutoff are aborted too.
    """
    if older_than < 0:
        raise ValueError(f"older_than must not be negative, got {older_than}")
    if namespace is not None and ("/" in namespace or not namespace):
        raise ValueError(f"namespace {namespace!r} is not valid")
    cutoff = (time.time() if now is None else now) - older_than
    store = open_store(location)
    report = GcReport(dry_run=dry_run)
    try:
        candidates: list[ObjectInfo] = []
        async for info in store.list(f"{namespace}/" if namespace else ""):
            report.scanned += 1
            if not _FRAGMENT_KEY.match(info.key):
                report.skipped_foreign += 1
            elif info.last_modified < cutoff:
                candidates.append(info)
        report.expired = len(candidates)
        for start in range(0, len(candidates), _GC_BATCH):
            batch = candidates[start : start + _GC_BATCH]
            current = await store.head_many([c.key for c in batch])
            doomed = [info for info in current if info is not None and info.last_modified < cutoff]
            if not dry_run:
                await gather_or_cancel(*(store.delete(info.key) for info in doomed))
            report.deleted += len(doomed)
            report.bytes_freed += sum(info.size for info in doomed)
            if progress is not None:
                progress(start + len(batch), len(candidates))
        if isinstance(store, S3Store):
            prefix = store._object_key(f"{namespace}/" if namespace else "")
            report.uploads_aborted = await asyncio.to_thread(_abort_uploads, store, prefix, cutoff, dry_run)
    finally:
        if location is not store:
            await store.close()
    return report


def _abort_uploads(store: S3Store, prefix: str, cutoff: float, dry_run: bool) -> int:
    """Abort multipart uploads under ``prefix`` started before ``cutoff`` (left by crashed writers)."""
    client = _s3_client(store)
    stale = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=store.bucket, Prefix=prefix):
        stale += [u for u in page.get("Uploads", []) if u["Initiated"].timestamp() < cutoff]
    if not dry_run:
        for upload in stale:
            client.abort_multipart_upload(Bucket=store.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return len(stale)
