"""The key layout: how a token prefix becomes an object name.

Every group of ``split_factor`` tokens is stored as one object whose name is a
digest chained over everything before it::

    root   = sha256(b"vua-s3/1\\0" + namespace + b"\\0" + salt)
    d[i]   = sha256(d[i-1] + tokens[i*S:(i+1)*S] as int64 little-endian)
    key[i] = "<namespace>/<hex(d[i])[:2]>/<hex(d[i])>.safetensors"

so a key names a whole prefix: two prompts share group ``i`` only if they agree on
all tokens up to its end. Keys are relative to the store's root (an S3 bucket
prefix or a directory); the two-character fan-out keeps POSIX directories small.
The digest never uses Python's ``hash()``, so keys agree across processes and hosts.
"""

from __future__ import annotations

import hashlib
import re
import sys

import torch

from .errors import SplitFactorError

LAYOUT_VERSION = 1
FRAGMENT_SUFFIX = ".safetensors"
_ROOT_TAG = f"vua-s3/{LAYOUT_VERSION}\0".encode()
_NAMESPACE_CHARS = "A-Za-z0-9._=+-"
_NAMESPACE = rf"[A-Za-z0-9][{_NAMESPACE_CHARS}]{{0,127}}"
_NAMESPACE_RE = re.compile(rf"^{_NAMESPACE}$")
_FRAGMENT_KEY_RE = re.compile(rf"^{_NAMESPACE}/[0-9a-f]{{2}}/[0-9a-f]{{64}}{re.escape(FRAGMENT_SUFFIX)}$")
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
    """Whether ``key`` has the shape of a fragment's key (tools touch nothing else)."""
    return _FRAGMENT_KEY_RE.match(key) is not None


def one_sequence(tokens: torch.Tensor) -> torch.Tensor:
    """A ``[n]`` or ``[1, n]`` tensor as 1-D; any other shape is a :class:`ValueError`."""
    if tokens.dim() == 2 and tokens.size(0) == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(f"tokens must have shape [n] or [1, n], got {list(tokens.shape)}")
    return tokens


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


def fragment_key(namespace: str, digest: bytes) -> str:
    """The key of the fragment for the group whose chained digest is ``digest``."""
    hexdigest = digest.hex()
    return f"{namespace}/{hexdigest[:2]}/{hexdigest}{FRAGMENT_SUFFIX}"


def group_keys(namespace: str, split_factor: int, ids: torch.Tensor, salt: str | None = None) -> list[str]:
    """The key of every group of an already validated token sequence."""
    return [fragment_key(namespace, d) for d in group_digests(ids, split_factor, namespace, salt)]
