"""Paths inside a store's root, reached without following symbolic links, and the file
modes and names the backend writes."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

FILE_MODE = 0o640
DIR_MODE = 0o750
TEMP_PREFIX = ".tmp-"
"""Names of files being written (renamed into place when complete)."""
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def open_parent(root: Path, key: str, *, create: bool = False) -> int:
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
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
        os.mkdir(name, DIR_MODE, dir_fd=parent)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW, dir_fd=parent)


def open_nofollow(root: Path, key: str, flags: int) -> int:
    """``key``'s file opened with ``flags``, no symbolic link followed on the way (ELOOP)."""
    parent = open_parent(root, key)
    try:
        return os.open(key.rsplit("/", 1)[-1], flags | NOFOLLOW, dir_fd=parent)
    finally:
        os.close(parent)


def write_all(fd: int, views: list[memoryview]) -> None:
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
