"""What S3 answers mean: the one place that maps botocore and aiohttp failures to vua_s3's errors."""

from __future__ import annotations

import aiohttp
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, SSLError
from botocore.exceptions import ConnectionError as BotoConnectionError

from ...errors import AccessDeniedError, ObjectNotFoundError, StoreError, StoreUnavailableError

NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
NO_BUCKET = frozenset({"NoSuchBucket"})
DENIED = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"})
#: Answers that mean "try later", not "this request is wrong": an outage once retries are spent.
UNAVAILABLE = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException"}
)
#: How S3 systems answer a checksum header they do not support.
CHECKSUM_REFUSALS = frozenset(
    {"400", "InvalidArgument", "InvalidRequest", "NotImplemented", "BadDigest", "XAmzContentSHA256Mismatch"}
)
#: A conditional put that found the key present.
PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412"})


def error_code(exc: BaseException) -> str:
    """The S3 error code of a failed request (or its HTTP status), else the exception's class name."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return type(exc).__name__


def map_error(exc: BaseException, operation: str, where: str, *, bucket: str, endpoint: str) -> StoreError:
    """A vua_s3 error for a failed ``operation`` on ``where`` (an object, or the bucket when
    ``where`` names no key), saying what to check; never shows credentials."""
    on_bucket = where.startswith("bucket ")
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in NOT_FOUND or code in NO_BUCKET:
            if on_bucket or code in NO_BUCKET:
                return StoreError(f"bucket {bucket!r} does not exist at {endpoint}")
            return ObjectNotFoundError(f"{where} does not exist")
        if code in DENIED or status == 403:
            return AccessDeniedError(
                f"{operation} on {where} was refused ({code}): check the credentials "
                "and that the policy allows this operation on the bucket and prefix"
            )
        if code in UNAVAILABLE or (isinstance(status, int) and status >= 500):
            return StoreUnavailableError(f"{operation} on {where} failed after retries: {code}")
        return StoreError(f"{operation} on {where} failed: {code}")
    if isinstance(exc, SSLError):
        return StoreError(
            f"{operation} on {where}: TLS failed ({exc}); if the endpoint uses a private CA, "
            "set ca_bundle=/path/to/ca.pem in the URL"
        )
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, aiohttp.ClientError)):
        return StoreUnavailableError(f"{operation} on {where} failed: {type(exc).__name__}: {exc}")
    return StoreError(f"{operation} on {where} failed: {type(exc).__name__}: {exc}")
