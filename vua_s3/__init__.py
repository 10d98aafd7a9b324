"""vua_s3: a KV-cache store for LLM inference on S3-compatible object storage and POSIX.

Store attention K/V by token prefix once; any inference server that later sees the
same prefix loads it instead of recomputing it.
"""

from .config import VUAConfig
from .errors import (
    AccessDeniedError,
    FragmentError,
    InvalidKeyError,
    InvalidLocationError,
    ObjectNotFoundError,
    SizeMismatchError,
    SplitFactorError,
    StoreError,
    StoreUnavailableError,
    VUAError,
)
from .shards import HeadRange
from .storage import ObjectInfo, Store, open_store
from .sync import VUA
from .vua import AsyncVUA, ClosestKV

__all__ = [
    "VUA",
    "AccessDeniedError",
    "AsyncVUA",
    "ClosestKV",
    "FragmentError",
    "HeadRange",
    "InvalidKeyError",
    "InvalidLocationError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "SizeMismatchError",
    "SplitFactorError",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "VUAConfig",
    "VUAError",
    "open_store",
]
