"""Exceptions raised by vua_s3.

Everything vua_s3 raises on purpose derives from :class:`VUAError`, so callers can
tell a cache problem from a bug in their own code with one ``except``.
"""

from __future__ import annotations


class VUAError(Exception):
    """Base class of every error vua_s3 raises on purpose."""


class SplitFactorError(VUAError, ValueError):
    """A token count is not a multiple of the configured split factor."""

    def __init__(self, num_tokens: int, split_factor: int) -> None:
        super().__init__(
            f"{num_tokens} tokens is not a multiple of split_factor={split_factor}; "
            "trim them with VUAConfig.trim_to_split_factor() first"
        )
        self.num_tokens = num_tokens
        self.split_factor = split_factor


class InvalidLocationError(VUAError, ValueError):
    """A store location (URL or path) or one of its settings is malformed."""


class StoreError(VUAError):
    """A storage backend failed in a way that is not a plain miss."""


class InvalidKeyError(StoreError, ValueError):
    """A key is not a relative, '/'-separated name a store can hold (a caller's bug)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or failed transiently: refused or reset connections,
    timeouts, HTTP 5xx and throttling left after retries. An outage, not a configuration
    error: ``get_closest`` and ``lookup`` serve it as a miss unless the cache is ``strict``."""


class ObjectNotFoundError(StoreError, KeyError):
    """The requested key does not exist in the store."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class AccessDeniedError(StoreError, PermissionError):
    """The store refused the request (HTTP 403, EACCES): credentials or policy."""


class SizeMismatchError(StoreError):
    """An object is not the size its probe reported: rewritten or damaged since."""


class FragmentError(VUAError):
    """A stored object is not a usable fragment for the query (corrupt, truncated, foreign)."""
