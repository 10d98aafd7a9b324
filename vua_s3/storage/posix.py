"""POSIX backend: keys are relative paths under a root directory (local disk, NFS, VAST NFS)."""

from __future__ import annotations

import asyncio
import builtins
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import (
    AccessDeniedError,
    InvalidKeyError,
    InvalidLocationError,
    ObjectNotFoundError,
    SizeMismatchError,
    StoreError,
    StoreUnavailableError,
)
from .base import Buffer, ObjectInfo, Store

FILE_MODE = 0o640
DIR_MODE = 0o750
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class PosixStore(Store):
    """Fragments as files under ``root``, written atomically (temp file, fsync, rename).

    Blocking file calls run in worker threads so the event loop keeps probing and
    transferring while the kernel copies data.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()
        try:
            if create:
                self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            elif not self.root.is_dir():
                raise InvalidLocationError(f"store directory {self.root} does not exist")
        except PermissionError as exc:
            raise AccessDeniedError(f"creating {self.root}: {exc.strerror}") from None

    @classmethod
    def from_url(cls, url: str) -> PosixStore:
        """A store for ``file:///absolute/path`` (no host, no query)."""
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query:
            raise InvalidLocationError(f"file URLs take an absolute path and no host or settings: {url!r}")
        if not parts.path:
            raise InvalidLocationError(f"file URL {url!r} has no path")
        return cls(unquote(parts.path))

    def _path(self, key: str) -> Path:
        """The file for ``key``; refuses keys that would leave the root."""
        if not key or key.startswith("/") or "\\" in key or "\0" in key:
            raise InvalidKeyError(f"invalid key {key!r}: keys are relative, '/'-separated paths")
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise InvalidKeyError(f"invalid key {key!r}: empty, '.' and '..' path segments are not allowed")
        return self.root / key

    async def get(self, key: str, size: int | None = None) -> bytearray:
        return await asyncio.to_thread(self._read, self._path(key), None)

    async def get_into(self, key: str, out: memoryview) -> None:
        await asyncio.to_thread(self._read, self._path(key), out)

    def _read(self, path: Path, out: memoryview | None) -> bytearray:
        """The file read straight into ``out`` (which it must fill exactly), or into a
        new buffer of its size when ``out`` is None: ``preadv`` fills the caller's
        memory with no staging copy."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{path} does not exist") from None
        except PermissionError as exc:
            raise AccessDeniedError(f"reading {path}: {exc.strerror}") from None
        except OSError as exc:
            raise StoreUnavailableError(f"reading {path}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            buf = bytearray(size) if out is None else bytearray()
            view = memoryview(buf) if out is None else out.cast("B")
            if len(view) != size:
                too = "short" if size < len(view) else "long"
                raise SizeMismatchError(f"{path} is too {too}: {size} bytes, expected {len(view)}")
            filled = 0
            while filled < size:
                n = os.preadv(fd, [view[filled:]], filled)
                if not n:
                    raise SizeMismatchError(f"{path} shrank while being read: {filled} of {size} bytes")
                filled += n
            return buf
        except PermissionError as exc:
            raise AccessDeniedError(f"reading {path}: {exc.strerror}") from None
        except OSError as exc:
            raise StoreUnavailableError(f"reading {path}: {exc}") from exc
        finally:
            os.close(fd)

    async def put(self, key: str, data: Buffer) -> None:
        await asyncio.to_thread(self._write, self._path(key), [memoryview(data)])

    async def put_segments(self, key: str, segments: Sequence[memoryview]) -> None:
        await asyncio.to_thread(self._write, self._path(key), segments)

    def _write(self, path: Path, segments: Sequence[memoryview]) -> None:
        """Write the segments with ``writev`` (no join), fsync, then rename into place."""
        try:
            _make_dirs(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                try:
                    os.fchmod(fd, FILE_MODE)
                    _write_all(fd, [s.cast("B") if s.format != "B" or s.ndim != 1 else s for s in segments])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except PermissionError as exc:
            raise AccessDeniedError(f"writing {path}: {exc.strerror}") from None
        except OSError as exc:
            raise StoreError(f"writing {path}: {exc}") from exc

    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        paths = [self._path(key) for key in keys]
        return await asyncio.to_thread(lambda: [self._stat(key, path) for key, path in zip(keys, paths, strict=True)])

    def _stat(self, key: str, path: Path) -> ObjectInfo | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise AccessDeniedError(f"checking {path}: {exc.strerror}") from None
        except OSError as exc:
            raise StoreUnavailableError(f"checking {path}: {exc}") from exc
        return ObjectInfo(key=key, size=st.st_size, last_modified=st.st_mtime)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except PermissionError as exc:
            raise AccessDeniedError(f"deleting {path}: {exc.strerror}") from None
        except OSError as exc:
            raise StoreError(f"deleting {path}: {exc}") from exc

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        infos = await asyncio.to_thread(self._walk, prefix)
        for info in infos:
            yield info

    def _walk(self, prefix: str) -> builtins.list[ObjectInfo]:
        found = []
        for dirpath, _dirs, files in os.walk(self.root, onerror=_raise_walk_error):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                path = os.path.join(dirpath, name)
                key = os.path.relpath(path, self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    found.append(ObjectInfo(key=key, size=st.st_size, last_modified=st.st_mtime))
        return found


def _raise_walk_error(exc: OSError) -> None:
    """``os.walk`` skips directories it cannot read; a listing must not silently miss them."""
    if isinstance(exc, PermissionError):
        raise AccessDeniedError(f"listing {exc.filename}: {exc.strerror}") from None
    if not isinstance(exc, FileNotFoundError):  # removed while walking: nothing to list there
        raise StoreUnavailableError(f"listing {exc.filename}: {exc}") from exc


def _write_all(fd: int, views: list[memoryview]) -> None:
    """``writev`` until every byte of ``views`` is written, at most IOV_MAX views a call."""
    views = [v for v in views if len(v)]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + _IOV_MAX])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` where every new directory gets DIR_MODE: ``Path.mkdir(parents=True)``
    gives the parents the umask's default, world-writable under ``umask 0``."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
