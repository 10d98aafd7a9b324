"""Storage: the interface (``base``), the choice of backend (``location``) and the backends."""

from .base import Buffer, ObjectInfo, Store
from .location import Location, open_store

__all__ = ["Buffer", "Location", "ObjectInfo", "Store", "open_store"]
