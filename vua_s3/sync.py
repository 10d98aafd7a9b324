"""``VUA``: the sync face of :class:`~vua_s3.vua.AsyncVUA`, for code without an event loop."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, overload

import torch

from .config import VUAConfig
from .fragment import KVCache
from .loop import BackgroundLoop
from .shards import HeadRange
from .storage import Location, Store
from .vua import AsyncVUA, ClosestKV


class VUA:
    """The verbs of :class:`AsyncVUA`, callable from any thread.

    The work runs on a private event loop thread, so it is safe from several threads and
    from code that is itself running an event loop. Connections are released by
    :meth:`close`, by ``with``, or at the latest when the object is collected or the
    interpreter exits (the original VUA API has no ``close``).
    """

    def __init__(self, config: VUAConfig | type[VUAConfig], location: Location, **options: Any) -> None:
        self._async = AsyncVUA(config, location, **options)
        self._loop = BackgroundLoop()
        self._closer = weakref.finalize(self, self._loop.close, self._async.close)

    def config(self) -> VUAConfig:
        """The configuration this cache was opened with."""
        return self._async.config()

    @property
    def store(self) -> Store:
        return self._async.store

    @property
    def core(self) -> AsyncVUA:
        """The async object behind this one (its verbs must run on this object's loop)."""
        return self._async

    def put(
        self, tokens: torch.Tensor, kvcache: KVCache, *, salt: str | None = None, heads: HeadRange | None = None
    ) -> int:
        """See :meth:`AsyncVUA.put`."""
        return self._loop.run(self._async.put(tokens, kvcache, salt=salt, heads=heads))

    @overload
    def get_closest(
        self,
        tokens: torch.Tensor,
        device: Any = ...,
        *,
        salt: str | None = ...,
        heads: HeadRange | None = ...,
        pinned: bool | None = ...,
    ) -> ClosestKV | None: ...
    @overload
    def get_closest(
        self,
        tokens: Sequence[torch.Tensor],
        device: Any = ...,
        *,
        salt: str | None = ...,
        heads: HeadRange | None = ...,
        pinned: bool | None = ...,
    ) -> list[ClosestKV | None]: ...
    def get_closest(
        self,
        tokens: torch.Tensor | Sequence[torch.Tensor],
        device: Any = "cpu",
        *,
        salt: str | None = None,
        heads: HeadRange | None = None,
        pinned: bool | None = None,
    ) -> ClosestKV | list[ClosestKV | None] | None:
        """See :meth:`AsyncVUA.get_closest`."""
        return self._loop.run(self._async.get_closest(tokens, device, salt=salt, heads=heads, pinned=pinned))

    def lookup(self, tokens: torch.Tensor, *, salt: str | None = None, heads: HeadRange | None = None) -> int:
        """See :meth:`AsyncVUA.lookup`."""
        return self._loop.run(self._async.lookup(tokens, salt=salt, heads=heads))

    def forget_known(self) -> None:
        """See :meth:`AsyncVUA.forget_known`."""
        self._async.forget_known()

    def close(self) -> None:
        """Release connections and stop the loop thread."""
        self._closer()

    def __enter__(self) -> VUA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
