"""``PosixStore``: keys are relative paths under a root directory, written atomically."""

from __future__ import annotations

import asyncio
import builtins
import os
import secrets
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ...errors import InvalidKeyError, InvalidLocationError, ObjectNotFoundError, SizeMismatchError, StoreError
from ...loop import in_thread
from ..base import Buffer, ObjectInfo, Store
from .errors import is_absent, mapped
from .paths import DIR_MODE, FILE_MODE, NOFOLLOW, TEMP_PREFIX, open_nofollow, open_parent, write_all


class PosixStore(Store):
    """Fragments as files under ``root``, written atomically (temp file, fsync, rename).

    Blocking file calls run in worker threads so the event loop keeps probing and
    transferring while the kernel copies data; a cancelled call still waits for its
    thread, so the caller's buffers stay untouched once it returns. Symbolic links inside
    the root are never followed: a linked file is not an object, and a linked directory
    is refused.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()
        with mapped("creating", self.root, failure=StoreError):
            if create:
                self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            elif not self.root.is_dir():
                raise InvalidLocationError(f"store directory {self.root} does not exist")

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
        return await in_thread(self._read, key, self._path(key), None)

    async def get_into(self, key: str, out: memoryview) -> None:
        await in_thread(self._read, key, self._path(key), out)

    def _read(self, key: str, path: Path, out: memoryview | None) -> bytearray:
        """The file read straight into ``out`` (which it must fill exactly), or into a
        new buffer of its size when ``out`` is None: ``preadv`` fills the caller's
        memory with no staging copy. No symbolic link is followed on the way."""
        with mapped("reading", path, absent=True):
            fd = open_nofollow(self.root, key, os.O_RDONLY)
        try:
            with mapped("reading", path):
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
        finally:
            os.close(fd)

    async def put(self, key: str, data: Buffer) -> None:
        await in_thread(self._write, key, self._path(key), [memoryview(data)])

    async def put_segments(self, key: str, segments: Sequence[memoryview]) -> None:
        await in_thread(self._write, key, self._path(key), segments)

    def _write(self, key: str, path: Path, segments: Sequence[memoryview]) -> None:
        """Write the segments with ``writev`` (no join) into a temporary file created through
        the parent directory's descriptor (no link followed), fsync, then rename into place."""
        with mapped("writing", path, failure=StoreError):
            parent = open_parent(self.root, key, create=True)
            try:
                tmp = TEMP_PREFIX + secrets.token_hex(8)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, FILE_MODE, dir_fd=parent)
                try:
                    try:
                        os.fchmod(fd, FILE_MODE)
                        write_all(fd, [s.cast("B") if s.format != "B" or s.ndim != 1 else s for s in segments])
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(tmp, path.name, src_dir_fd=parent, dst_dir_fd=parent)
                except BaseException:
                    os.unlink(tmp, dir_fd=parent)
                    raise
            finally:
                os.close(parent)

    async def head_many(self, keys: Sequence[str]) -> list[ObjectInfo | None]:
        paths = [self._path(key) for key in keys]
        return await asyncio.to_thread(lambda: [self._stat(key, path) for key, path in zip(keys, paths, strict=True)])

    def _stat(self, key: str, path: Path) -> ObjectInfo | None:
        with mapped("checking", path):
            try:
                parent = open_parent(self.root, key)
                try:
                    st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
                finally:
                    os.close(parent)
            except OSError as exc:
                if is_absent(exc):
                    return None
                raise
        if stat.S_ISLNK(st.st_mode):
            return None
        return ObjectInfo(key=key, size=st.st_size, last_modified=st.st_mtime)

    async def refresh(self, key: str, written_before: float) -> bool:
        return await in_thread(self._touch, key, self._path(key), written_before)

    def _touch(self, key: str, path: Path, written_before: float) -> bool:
        """The file's mtime set to now through a descriptor (no link followed; a file renamed
        over it meanwhile is not touched, as the old one is what was opened). Setting it
        takes ownership of the file or write permission on it (``docs/operations.md``)."""
        try:
            with mapped("refreshing", path, absent=True):
                fd = open_nofollow(self.root, key, os.O_RDONLY)
        except ObjectNotFoundError:
            return False
        try:
            with mapped("refreshing", path):
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_mtime > written_before:
                    return False
                os.utime(fd)
                return True
        finally:
            os.close(fd)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        with mapped("deleting", path, failure=StoreError):
            await asyncio.to_thread(self._unlink, key, path)

    def _unlink(self, key: str, path: Path) -> None:
        try:
            parent = open_parent(self.root, key)
        except OSError as exc:
            if is_absent(exc):
                return  # no object there (or the key's directory is a link)
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


def _raise_walk_error(exc: OSError) -> None:
    """``os.walk`` skips directories it cannot read; a listing must not silently miss them."""
    if isinstance(exc, FileNotFoundError):  # removed while walking: nothing to list there
        return
    with mapped("listing", exc.filename):
        raise exc
