"""The file floors of the GPU bench: plain reads and writes of the same objects on threads,
each thread a share of them, with nothing of vua_s3 in the way."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor


def _shares(count: int, threads: int) -> list[range]:
    step = -(-count // max(1, threads))
    return [range(i, min(i + step, count)) for i in range(0, count, step)]


def read_files(paths: Sequence[str], views: Sequence[memoryview], pool: ThreadPoolExecutor, threads: int) -> None:
    """Read each of ``paths`` into its view, ``threads`` threads each taking a share."""

    def read(share: range) -> None:
        for i in share:
            fd = os.open(paths[i], os.O_RDONLY)
            try:
                filled, view = 0, views[i]
                while filled < len(view):
                    n = os.preadv(fd, [view[filled:]], filled)
                    if not n:
                        raise OSError(f"{paths[i]} is shorter than {len(view)} bytes")
                    filled += n
            finally:
                os.close(fd)

    list(pool.map(read, _shares(len(paths), threads)))


def write_files(paths: Sequence[str], views: Sequence[memoryview], pool: ThreadPoolExecutor, threads: int) -> None:
    """Write each view to its path and fsync it, ``threads`` threads each taking a share."""

    def write(share: range) -> None:
        for i in share:
            fd = os.open(paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = views[i]
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

    list(pool.map(write, _shares(len(paths), threads)))
