"""What POSIX failures mean: the one place that maps ``OSError`` to vua_s3's errors (as
``s3/errors.py`` does for S3 answers)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from ...errors import AccessDeniedError, ObjectNotFoundError, StoreError, StoreUnavailableError


def is_absent(exc: OSError) -> bool:
    """No object there: the file is missing, or a symbolic link (never followed) stands in its way."""
    return isinstance(exc, FileNotFoundError) or exc.errno == errno.ELOOP


@contextlib.contextmanager
def mapped(
    action: str,
    path: str | os.PathLike[str],
    *,
    failure: type[StoreError] = StoreUnavailableError,
    absent: bool = False,
) -> Iterator[None]:
    """``OSError`` inside as a vua_s3 error saying what failed where: refused access is
    :class:`AccessDeniedError`; with ``absent``, a missing object :class:`ObjectNotFoundError`;
    anything else ``failure`` (an outage for reads, a plain store error for writes)."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise AccessDeniedError(f"{action} {path}: {exc.strerror}") from None
        if absent and is_absent(exc):
            raise ObjectNotFoundError(f"{path} does not exist ({exc.strerror})") from None
        raise failure(f"{action} {path}: {exc}") from exc
