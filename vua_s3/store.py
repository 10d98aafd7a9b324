"""The storage interface: the few verbs vua_s3 needs from any object store.

A backend maps relative keys (``keys.py``) to objects. Contract:

* ``put`` is atomic: a reader sees all of an object or nothing, and concurrent puts
  of the same key are safe (last writer wins; vua_s3 writes identical bytes).
* ``head_many`` is one concurrent wave, never one request after another.
* A missing key is ``None`` from ``head_many`` and :class:`ObjectNotFoundError` from
  ``get``; refused access is :class:`AccessDeniedError`; anything else that fails is
  :class:`StoreError`. A miss is never reported as an error, nor an error as a miss.

Backends are async at the core; :class:`vua_s3.VUA` gives them a sync face.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import InvalidLocationError, StoreError

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD or a listing tells about one object."""

    key: str
    size: int
    last_modified: float
    """Seconds since the epoch."""


class SizeMismatchError(StoreError):
    """An object is not the size its probe reported: rewritten or damaged since."""


class Store(ABC):
    """An object store rooted at a bucket prefix or a directory."""

    url: str
    """Where the store is, for messages; never contains credentials."""

    @abstractmethod
    async def get(self, key: str, size: int | None = None) -> bytearray:
        """The whole object. ``size`` (from ``head_many``) lets a backend preallocate
        and split the read into parallel ranges without another round trip."""

    async def get_into(self, key: str, out: memoryview) -> None:
        """Read the whole object, exactly ``len(out)`` bytes (its size from ``head_many``),
        into ``out``: lets the caller reuse buffers, as fresh memory costs page faults.
        Backends override this to receive in place; the default copies."""
        data = await self.get(key, len(out))
        if len(data) != len(out):
            too = "short" if len(data) < len(out) else "long"
            raise SizeMismatchError(f"{key} in {self.url} is too {too}: {len(data)} bytes, expected {len(out)}")
        out[:] = data

    @abstractmethod
    async def put(self, key: str, data: Buffer) -> None:
        """Store ``data`` under ``key`` atomically, replacing any previous object."""

    async def put_segments(self, key: str, segments: Sequence[memoryview]) -> None:
        """Store the concatenation of ``segments`` under ``key``, atomically like ``put``.
        Backends override this to send the pieces without joining them; the default joins."""
        await self.put(key, bytearray().join(segments))

    @abstractmethod
    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        """Probe many keys concurrently; ``None`` where a key does not exist."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in no particular order."""

    async def close(self) -> None:  # noqa: B027 - backends without resources keep the default
        """Release connections and other resources."""


def open_store(location: str | os.PathLike[str] | Store) -> Store:
    """A store for ``s3://bucket/prefix?settings``, ``file:///path``, a plain path, or a store."""
    if isinstance(location, Store):
        return location
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str) or not location:
        raise InvalidLocationError(f"a store location must be a non-empty URL or path, got {location!r}")
    scheme = urlsplit(location).scheme if "://" in location else ""
    if scheme in ("s3", "s3a"):
        from .s3 import S3Store

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


def redact_url(url: str) -> str:
    """``url`` with any user:password part masked, safe to show in messages and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()
