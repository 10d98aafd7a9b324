"""POSIX backend: keys are relative paths under a root directory (local disk, NFS, VAST NFS)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import os
import secrets
import stat
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
TEMP_PREFIX = ".tmp-"
"""Names of files being written (renamed into place when complete)."""
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class PosixStore(Store):
    """Fragments as files under ``root``, written atomically (temp file, fsync, rename).

    Blocking file calls run in worker threads so the event loop keeps probing and
    transferring while the kernel copies data. Symbolic links inside the root are never
    followed: a linked file is not an object, and a linked directory is refused.
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
        return await asyncio.to_thread(self._read, key, self._path(key), None)

    async def get_into(self, key: str, out: memoryview) -> None:
        await asyncio.to_thread(self._read, key, self._path(key), out)

    def _read(self, key: str, path: Path, out: memoryview | None) -> bytearray:
        """The file read straight into ``out`` (which it must fill exactly), or into a
        new buffer of its size when ``out`` is None: ``preadv`` fills the caller's
        memory with no staging copy. No symbolic link is followed on the way."""
        try:
            fd = _open_nofollow(self.root, key, os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{path} does not exist") from None
        except PermissionError as exc:
            raise AccessDeniedError(f"reading {path}: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ObjectNotFoundError(f"{path}: {exc.strerror}") from None
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
        await asyncio.to_thread(self._write, key, self._path(key), [memoryview(data)])

    async def put_segments(self, key: str, segments: Sequence[memoryview]) -> None:
        await asyncio.to_thread(self._write, key, self._path(key), segments)

    def _write(self, key: str, path: Path, segments: Sequence[memoryview]) -> None:
        """Write the segments with ``writev`` (no join) into a temporary file created through
        the parent directory's descriptor (no link followed), fsync, then rename into place."""
        try:
            parent = _open_parent(self.root, key, create=True)
            try:
                tmp = TEMP_PREFIX + secrets.token_hex(8)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, FILE_MODE, dir_fd=parent)
                try:
                    try:
                        os.fchmod(fd, FILE_MODE)
                        _write_all(fd, [s.cast("B") if s.format != "B" or s.ndim != 1 else s for s in segments])
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(tmp, path.name, src_dir_fd=parent, dst_dir_fd=parent)
                except BaseException:
                    os.unlink(tmp, dir_fd=parent)
                    raise
            finally:
                os.close(parent)
        except PermissionError as exc:
            raise AccessDeniedError(f"writing {path}: {exc.strerror}") from None
        except OSError as exc:
            raise StoreError(f"writing {path}: {exc}") from exc

    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        paths = [self._path(key) for key in keys]
        return await asyncio.to_thread(lambda: [self._stat(key, path) for key, path in zip(keys, paths, strict=True)])

    def _stat(self, key: str, path: Path) -> ObjectInfo | None:
        try:
            parent = _open_parent(self.root, key)
            try:
                st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(parent)
            if stat.S_ISLNK(st.st_mode):
                return None
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise AccessDeniedError(f"checking {path}: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None
            raise StoreUnavailableError(f"checking {path}: {exc}") from exc
        return ObjectInfo(key=key, size=st.st_size, last_modified=st.st_mtime)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(self._unlink, key, path)
        except PermissionError as exc:
            raise AccessDeniedError(f"deleting {path}: {exc.strerror}") from None
        except OSError as exc:
            raise StoreError(f"deleting {path}: {exc}") from exc

    def _unlink(self, key: str, path: Path) -> None:
        try:
            parent = _open_parent(self.root, key)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return  # no object there: the key's directory is a link
            raise
        try:
            os.unlink(path.name, dir_fd=parent)
        except FileNotFoundError:
            pass
        finally:
            os.close(parent)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        infos = await asyncio.to_thread(self._walk, prefix)
        for info in infos:
            yield info

    def _walk(self, prefix: str) -> builtins.list[ObjectInfo]:
        found = []
        for dirpath, _dirs, files in os.walk(self.root, onerror=_raise_walk_error):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(dirpath, name)
                key = os.path.relpath(path, self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    try:
                        st = os.lstat(path)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISLNK(st.st_mode):
                        continue
                    found.append(ObjectInfo(key=key, size=st.st_size, last_modified=st.st_mtime))
        return found

    async def abort_incomplete(self, prefix: str, started_before: float, *, dry_run: bool = False) -> int:
        """Remove temporary files under ``prefix`` last written before ``started_before``: left
        by writers that crashed between creating and renaming them."""
        return await asyncio.to_thread(self._remove_temporaries, prefix, started_before, dry_run)

    def _remove_temporaries(self, prefix: str, started_before: float, dry_run: bool) -> int:
        removed = 0
        for dirpath, _dirs, files, dirfd in os.fwalk(self.root):  # never follows links
            for name in files:
                key = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if not name.startswith(TEMP_PREFIX) or not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or st.st_mtime >= started_before:
                        continue
                    if not dry_run:
                        os.unlink(name, dir_fd=dirfd)
                except FileNotFoundError:
                    continue  # renamed into place or removed meanwhile
                removed += 1
        return removed


_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _open_parent(root: Path, key: str, *, create: bool = False) -> int:
    """A descriptor of ``key``'s directory, reached from ``root`` one component at a time
    without following symbolic links: a link planted inside the root cannot send a read or a
    write outside it, whatever is swapped in meanwhile. ``create`` makes missing directories
    (mode DIR_MODE). A link in the way raises ``OSError(ELOOP)``."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in key.split("/")[:-1]:
            try:
                child = _open_directory(part, fd, create)
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, f"{part!r} is a symbolic link, not followed inside the store") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_directory(name: str, parent: int, create: bool) -> int:
    """Directory ``name`` under ``parent``, made (mode DIR_MODE) first if missing and ``create``:
    an existing directory, the usual case, costs one open and no mkdir."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
        os.mkdir(name, DIR_MODE, dir_fd=parent)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=parent)


def _open_nofollow(root: Path, key: str, flags: int) -> int:
    """``key``'s file opened with ``flags``, no symbolic link followed on the way (ELOOP)."""
    parent = _open_parent(root, key)
    try:
        return os.open(key.rsplit("/", 1)[-1], flags | _NOFOLLOW, dir_fd=parent)
    finally:
        os.close(parent)


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
