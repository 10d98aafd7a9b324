"""The POSIX backend: fragments as files under a directory (local disk, NFS, VAST NFS)."""

from .paths import DIR_MODE, FILE_MODE, TEMP_PREFIX
from .store import PosixStore

__all__ = ["DIR_MODE", "FILE_MODE", "TEMP_PREFIX", "PosixStore"]
