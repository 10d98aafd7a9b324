"""Cache configuration: how tokens are grouped and which model a cache belongs to."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .checks import positive_int
from .keys import Group, Span, chain, check_namespace, group_keys, one_sequence, token_ids

_R = TypeVar("_R")

#: Tokens per stored group unless configured: a multiple of every vLLM block size.
DEFAULT_SPLIT_FACTOR = 256
_IDENTITY_RE = re.compile(r"^[A-Za-z0-9._=+:/-]{0,256}$")


class _config_method(Generic[_R]):
    """A method callable on an instance or on the class itself.

    The original VUA API calls ``VUAConfig.trim_to_split_factor(tokens)`` on the class;
    here the class stands for its default instance, so both spellings work.
    """

    def __init__(self, func: Callable[..., _R]) -> None:
        self._func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: VUAConfig | None, owner: type[VUAConfig]) -> Callable[..., _R]:
        target = obj if obj is not None else owner()
        return self._func.__get__(target, owner)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class VUAConfig:
    """Settings a cache is valid for.

    ``split_factor`` is the number of tokens per stored group. ``namespace`` names
    the model a cache holds (part of every key): fragments written under one namespace
    are never returned under another, so models can share a bucket. ``identity``, when
    set, is a digest of everything that changes the model's K/V bytes (the integrations
    derive it); it is written into every object and checked on read, so two deployments
    that chose the same namespace for different models cannot read each other's KV.
    """

    split_factor: int = DEFAULT_SPLIT_FACTOR
    namespace: str = "default"
    identity: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.split_factor, bool) or not isinstance(self.split_factor, int):
            raise TypeError(f"split_factor must be an int, got {self.split_factor!r}")
        positive_int("split_factor", self.split_factor)
        check_namespace(self.namespace)
        if not isinstance(self.identity, str) or not _IDENTITY_RE.match(self.identity):
            raise ValueError(
                f"identity {self.identity!r} is not valid: "
                "use at most 256 characters of letters, digits and . _ = + : / -"
            )

    @classmethod
    def coerce(cls, config: VUAConfig | type[VUAConfig]) -> VUAConfig:
        """Accept the class itself (the seed API passes ``VUAConfig``) or an instance."""
        if isinstance(config, VUAConfig):
            return config
        if isinstance(config, type) and issubclass(config, VUAConfig):
            return config()
        raise TypeError(f"expected VUAConfig or an instance of it, got {config!r}")

    @_config_method
    def trim_to_split_factor(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drop trailing tokens so the length is a multiple of ``split_factor``.

        ``[n]`` and ``[1, n]`` inputs both give a 1-D result, as in the original VUA.
        """
        tokens = one_sequence(tokens)
        return tokens[: len(tokens) - len(tokens) % self.split_factor]

    @_config_method
    def tokens_to_paths(self, tokens: torch.Tensor, salt: str | None = None, kv_heads: int | None = None) -> list[str]:
        """The storage keys (relative to the store root) of ``tokens``: one per group (the
        object probed for it), or with ``kv_heads`` every head's, group by group."""
        return group_keys(self.namespace, self.split_factor, token_ids(tokens, self.split_factor), salt, kv_heads)

    def chain(self, ids: torch.Tensor, salt: str | None = None) -> list[Group]:
        """The groups of a validated token sequence (:func:`~vua_s3.keys.token_ids`) in this cache."""
        return chain(ids, self.split_factor, self.namespace, salt, self.identity)

    def span_groups(self, span: Span) -> list[Group]:
        """The groups of a :class:`~vua_s3.keys.Span` in this cache."""
        return span.groups(self.namespace, self.split_factor, self.identity)

    # The original VUA spelled it in the singular.
    tokens_to_path = tokens_to_paths
