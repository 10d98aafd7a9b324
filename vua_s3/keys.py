"""The key layout (format version 2): how a token prefix and a KV head become an object name.

Every group of ``split_factor`` tokens is named by a digest chained over everything
before it, and each of its KV heads is one object::

    root      = sha256(b"vua-s3/1\\0" + namespace + b"\\0" + salt)
    d[i]      = sha256(d[i-1] + tokens[i*S:(i+1)*S] as int64 little-endian)
    key[i, h] = "<namespace>/<hex(d[i])[:2]>/<hex(d[i])>.h<h>.safetensors"

so a key names a whole prefix: two prompts share group ``i`` only if they agree on
all tokens up to its end. One object per KV head makes the objects independent of the
tensor-parallel size: a rank writes the heads it holds and reads the heads it needs,
whatever the TP size of the writer (``shards.py``; ``docs/format.md`` has the request and byte
counts that chose this layout). Keys are relative to the store's root (an S3 bucket
prefix or a directory); the two-character fan-out keeps POSIX directories small. The
digest never uses Python's ``hash()``, so keys agree across processes and hosts.

The chain is the one of version 1, whose keys had no ``.h<h>`` part (one object held
every head): such objects are never read, since no query asks for their keys; the
tools recognise them (:func:`parse_key`) so they can be listed and expired.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from . import fragment
from .errors import SplitFactorError
from .shards import HeadRange

LAYOUT_VERSION = 2
FRAGMENT_SUFFIX = ".safetensors"
_ROOT_TAG = b"vua-s3/1\0"  # the chain of version 1, kept: version 2 changed what an object holds
_NAMESPACE_CHARS = "A-Za-z0-9._=+-"
_NAMESPACE = rf"[A-Za-z0-9][{_NAMESPACE_CHARS}]{{0,127}}"
_NAMESPACE_RE = re.compile(rf"^{_NAMESPACE}$")
_FRAGMENT_KEY_RE = re.compile(
    rf"^{_NAMESPACE}/(?P<fan>[0-9a-f]{{2}})/(?P<digest>[0-9a-f]{{64}})"
    rf"(?:\.h(?P<head>0|[1-9][0-9]{{0,5}}))?{re.escape(FRAGMENT_SUFFIX)}$"
)
_NOT_NAMESPACE_RE = re.compile(rf"[^{_NAMESPACE_CHARS}]+")

if sys.byteorder != "little":  # pragma: no cover - torch ships little-endian builds only
    raise ImportError("vua_s3 stores int64 little-endian tokens and needs a little-endian host")


def check_namespace(namespace: object) -> str:
    """``namespace`` if it can be a key's first segment, else a :class:`ValueError` saying why."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"namespace {namespace!r} is not valid: use 1-128 characters of "
            "letters, digits and . _ = + -, starting with a letter or digit"
        )
    return namespace


def namespace_part(text: str, replacement: str = "-") -> str:
    """``text`` (a model name, an architecture) with every run of characters a namespace cannot
    hold replaced, for the readable part of a derived namespace."""
    return _NOT_NAMESPACE_RE.sub(replacement, text)


def is_fragment_key(key: str) -> bool:
    """Whether ``key`` has the shape of a fragment's key, format 1 or 2 (tools touch nothing else)."""
    return parse_key(key) is not None


@dataclass(frozen=True)
class KeyInfo:
    """What a fragment key says about its object (the namespace is the key's first part)."""

    digest: str
    head: int | None
    """``None`` for a format 1 key (one object held every head)."""

    @property
    def version(self) -> int:
        return 1 if self.head is None else LAYOUT_VERSION


def parse_key(key: str) -> KeyInfo | None:
    """The parts of a format 1 or 2 fragment key, or ``None`` for any other object."""
    match = _FRAGMENT_KEY_RE.match(key)
    if match is None or match["fan"] != match["digest"][:2]:
        return None
    head = match["head"]
    return KeyInfo(match["digest"], None if head is None else int(head))


def one_sequence(tokens: torch.Tensor) -> torch.Tensor:
    """A ``[n]`` or ``[1, n]`` tensor as 1-D; any other shape is a :class:`ValueError`."""
    if tokens.dim() == 2 and tokens.size(0) == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(f"tokens must have shape [n] or [1, n], got {list(tokens.shape)}")
    return tokens


def whole_groups(tokens: torch.Tensor, split_factor: int) -> torch.Tensor | None:
    """A query's tokens as 1-D, trimmed to whole groups; ``None`` if shorter than one group."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.numel() == 0:
        raise ValueError("tokens is empty: there is nothing to look up")
    tokens = one_sequence(tokens)
    trimmed = tokens[: len(tokens) - len(tokens) % split_factor]
    return trimmed if trimmed.numel() else None


def token_ids(tokens: torch.Tensor, split_factor: int) -> torch.Tensor:
    """Validate one sequence of token ids and return it as a 1-D int64 CPU tensor.

    Accepts ``[n]`` or ``[1, n]`` integer tensors whose length is a multiple of
    ``split_factor`` (the caller trims first).
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    tokens = one_sequence(tokens)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError("tokens is empty: there is nothing to store or look up")
    if tokens.numel() % split_factor:
        raise SplitFactorError(tokens.numel(), split_factor)
    ids = tokens.detach().to("cpu", torch.int64)
    if bool((ids < 0).any()):
        raise ValueError("tokens must be non-negative token ids")
    return ids.contiguous()


def root_digest(namespace: str, salt: str | None) -> bytes:
    """The chain's starting point: binds every key to a namespace and optional salt."""
    return hashlib.sha256(_ROOT_TAG + namespace.encode() + b"\0" + (salt or "").encode()).digest()


def group_digests(ids: torch.Tensor, split_factor: int, namespace: str, salt: str | None) -> list[bytes]:
    """The chained digest of each full group in ``ids`` (validated by :func:`token_ids`)."""
    raw = memoryview(int64_le_bytes(ids))
    step = split_factor * 8
    digest = root_digest(namespace, salt)
    digests = []
    for start in range(0, len(raw) - len(raw) % step, step):
        digest = hashlib.sha256(digest + raw[start : start + step]).digest()
        digests.append(digest)
    return digests


def int64_le_bytes(ids: torch.Tensor) -> bytearray:
    """The int64 little-endian bytes of a 1-D integer tensor, without numpy."""
    out = bytearray(ids.numel() * 8)
    if out:
        torch.frombuffer(out, dtype=torch.int64).copy_(ids)
    return out


def fragment_key(namespace: str, digest: bytes, head: int) -> str:
    """The key of KV head ``head`` of the group whose chained digest is ``digest``."""
    hexdigest = digest.hex()
    return f"{namespace}/{hexdigest[:2]}/{hexdigest}.h{head}{FRAGMENT_SUFFIX}"


@dataclass(frozen=True)
class Group:
    """One group of one token sequence: its place in the chain, the names of its head
    objects, and what each of them must say about itself (its metadata)."""

    namespace: str
    split_factor: int
    number: int
    digest: bytes
    parent: bytes | None
    identity: str = ""
    """The writer's model identity (``VUAConfig.identity``), checked on read."""
    ids_from: int = 0
    """The token the ids this group is written from and checked against begin at: 0 for a
    whole sequence, the first group's start for a :class:`Span`."""

    @property
    def start(self) -> int:
        """The group's first token in the sequence."""
        return self.number * self.split_factor

    @property
    def stop(self) -> int:
        return self.start + self.split_factor

    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """This group's tokens of ``ids`` (which begin at token :attr:`ids_from`)."""
        return ids[self.start - self.ids_from : self.stop - self.ids_from]

    def key(self, head: int) -> str:
        """The key of KV head ``head``'s object."""
        return fragment_key(self.namespace, self.digest, head)

    def keys(self, heads: Iterable[int]) -> tuple[str, ...]:
        return tuple(self.key(head) for head in heads)

    def metadata(self) -> dict[str, str]:
        """The metadata every head object of this group carries (and a reader checks)."""
        return fragment.group_metadata(
            self.namespace, self.split_factor, self.number, self.digest, self.parent, self.identity
        )

    def encoded_size(self, layers: int, head_dim: int, dtype: torch.dtype, heads: HeadRange) -> int:
        """The size of each head object of this group for a KV layout: every head of a
        group has the same size, so a reader that knows the layout fetches without a probe."""
        return fragment.encoded_size(
            layers, self.split_factor, head_dim, dtype, self.metadata(), head=heads.representative, kv_heads=heads.total
        )

    def check(self, frag: fragment.Fragment, ids: torch.Tensor, head: int) -> None:
        """Raise :class:`~vua_s3.errors.FragmentError` unless ``frag`` is KV head ``head`` of
        this group and holds its tokens of ``ids`` (the whole query, or a span's tokens)."""
        fragment.check_group(frag, self.metadata(), self.tokens(ids), head)


def chain(ids: torch.Tensor, split_factor: int, namespace: str, salt: str | None, identity: str = "") -> list[Group]:
    """Every full group of ``ids`` (validated by :func:`token_ids`), in order."""
    digests = group_digests(ids, split_factor, namespace, salt)
    return [
        Group(namespace, split_factor, i, digest, digests[i - 1] if i else None, identity)
        for i, digest in enumerate(digests)
    ]


@dataclass(frozen=True)
class Span:
    """Consecutive groups of one token sequence, named without the tokens before them: the
    number of the first, their chained digests and the digest of the group before it
    (``None`` at group 0). A caller that already chained a sequence hands a span and the
    span's tokens to :meth:`~vua_s3.AsyncVUA.load_span` and :meth:`~vua_s3.AsyncVUA.put_span`,
    so a message about a few new groups of a long prompt stays as small as those groups."""

    first: int
    digests: tuple[bytes, ...]
    parent: bytes | None

    @classmethod
    def of(cls, groups: Sequence[Group], start: int, stop: int) -> Span:
        """Groups ``[start, stop)`` of a chain (:func:`chain`)."""
        if not 0 <= start <= stop <= len(groups):
            raise ValueError(f"span [{start}, {stop}) is not within the chain's {len(groups)} groups")
        return cls(start, tuple(g.digest for g in groups[start:stop]), groups[start - 1].digest if start else None)

    @property
    def stop(self) -> int:
        """The group after the last."""
        return self.first + len(self.digests)

    def groups(self, namespace: str, split_factor: int, identity: str = "") -> list[Group]:
        """The span's groups; their tokens are read from ids beginning at the first's start."""
        parents = (self.parent, *self.digests)[: len(self.digests)]
        base = self.first * split_factor
        return [
            Group(namespace, split_factor, self.first + i, digest, parent, identity, ids_from=base)
            for i, (digest, parent) in enumerate(zip(self.digests, parents, strict=True))
        ]


def group_keys(
    namespace: str, split_factor: int, ids: torch.Tensor, salt: str | None = None, kv_heads: int | None = None
) -> list[str]:
    """The keys of an already validated token sequence, group by group: every head's with
    ``kv_heads``, else the one probed for each group (its head 0)."""
    heads = range(1) if kv_heads is None else HeadRange.all(kv_heads).heads
    return [key for group in chain(ids, split_factor, namespace, salt) for key in group.keys(heads)]
