"""The S3 backend: settings (``settings``), error mapping (``errors``), bodies (``body``), the
direct HEAD path (``direct_head``) and the store (``store``)."""

from .settings import S3Settings
from .store import S3Store

__all__ = ["S3Settings", "S3Store"]
