"""Storage: the interface (``base``), the choice of backend (``location``) and the backends."""

from .base import Buffer, ObjectInfo, Store
from .location import open_store

__all__ = ["Buffer", "ObjectInfo", "Store", "open_store"]
