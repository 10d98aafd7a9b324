"""From a location (``s3://…``, ``file://…``, a path) to a store; backends are imported lazily,
so a POSIX-only user never imports botocore."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from ..errors import InvalidLocationError
from ..logsafe import redact_url
from .base import Store

#: Where a cache lives: ``s3://bucket/prefix?settings``, ``file:///path``, a plain path, or a store.
Location = str | os.PathLike[str] | Store


def open_store(location: Location) -> Store:
    """A store for ``s3://bucket/prefix?settings``, ``file:///path``, a plain path, or a store."""
    if isinstance(location, Store):
        return location
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str) or not location:
        raise InvalidLocationError(f"a store location must be a non-empty URL or path, got {location!r}")
    scheme = urlsplit(location).scheme if "://" in location else ""
    if scheme in ("s3", "s3a"):
        from .s3.store import S3Store

        return S3Store.from_url(location)
    if scheme == "file":
        from .posix import PosixStore

        return PosixStore.from_url(location)
    if scheme == "":
        from .posix import PosixStore

        return PosixStore(location)
    raise InvalidLocationError(
        f"unknown URL scheme {scheme!r} in {redact_url(location)!r}: "
        "use s3://bucket/prefix, file:///path or a plain path"
    )
