"""The storage interface: the few verbs vua_s3 needs from any object store.

A backend maps relative keys (``keys.py``) to objects. Contract:

* ``put`` is atomic: a reader sees all of an object or nothing, and concurrent puts
  of the same key are safe (last writer wins; vua_s3 writes identical bytes).
* ``head_many`` and ``head_siblings`` are one concurrent wave, never one request after another.
* ``refresh`` moves an object's last-modified time to now and changes nothing else: its bytes,
  what its writer set and its checksum stay; racing a delete or a rewrite it leaves the old
  object, the new one or none, never a mix.
* A missing key is ``None`` from ``head_many``/``head_siblings`` and :class:`ObjectNotFoundError` from
  ``get``; refused access is :class:`AccessDeniedError`; anything else that fails is
  :class:`StoreError`. A miss is never reported as an error, nor an error as a miss.

Backends are async at the core; :class:`vua_s3.VUA` gives them a sync face. Which backend a
location names is decided in ``location.py``, outside this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from ..errors import SizeMismatchError, StoreError

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD or a listing tells about one object."""

    key: str
    size: int
    last_modified: float
    """Seconds since the epoch."""


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

    async def put_checked(self, key: str, segments: Sequence[memoryview], crc32c: int) -> None:
        """``put_segments`` from a caller that knows the CRC-32C of the concatenation: a
        backend whose server can check an upload sends it along (S3:
        ``x-amz-checksum-crc32c``); the default has no use for it."""
        await self.put_segments(key, segments)

    @abstractmethod
    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        """Probe many keys concurrently; ``None`` where a key does not exist."""

    async def head_siblings(self, sets: Sequence[Sequence[str]]) -> list[list[ObjectInfo | None]]:
        """Probe several sets of keys in one concurrent wave, answering each set together:
        the keys of a set share a name prefix (the head objects of one group), so a backend
        that can list a prefix answers a set of several keys with one request (S3: one
        listing instead of a HEAD per key). ``None`` where a key does not exist. The default
        probes every key with ``head_many``: no scan of what else the prefix holds."""
        flat = await self.head_many([key for keys in sets for key in keys])
        answers, at = [], 0
        for keys in sets:
            answers.append(flat[at : at + len(keys)])
            at += len(keys)
        return answers

    async def refresh(self, key: str, written_before: float) -> bool:
        """Stamp ``key`` as last modified now, if it was last modified at or before
        ``written_before`` (seconds since the epoch; S3 compares to the second): so expiry by
        last write (lifecycle rules, ``gc``) counts from the last use. ``False``, and nothing
        done, if it was modified later (another reader refreshed it, a writer rewrote it) or
        is gone: a refresh never creates an object. Backends that cannot keep the default,
        which refuses."""
        raise StoreError(f"{type(self).__name__} at {self.url} cannot refresh objects")

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in no particular order."""

    async def abort_incomplete(self, prefix: str, started_before: float, *, dry_run: bool = False) -> int:
        """Abort incomplete writes under ``prefix`` begun before ``started_before`` (seconds since
        the epoch), left by crashed writers; return how many there were. Backends whose writes
        leave nothing behind keep the default."""
        return 0

    async def close(self) -> None:  # noqa: B027 - backends without resources keep the default
        """Release connections and other resources."""
