"""The S3 backend: settings (``settings``), error mapping (``errors``), bodies (``body``), the
direct probe path (``direct_probe``) and the store (``store``)."""

from .settings import S3Settings
from .store import S3Store

__all__ = ["S3Settings", "S3Store"]
