"""Which weights a model was loaded from, read cheaply and offline, for the integrations' identities.

A hub checkpoint is named by the commit it resolved to (commits are immutable). A local path is
named by its files: each one's relative name, size and modification time, and a sampled digest
of its content (small files whole, large ones at evenly spaced places), so that new weights at
the same path change the identity even where a copy kept the old sizes and times (same-shape
checkpoints have equal sizes; image builds and ``rsync -a`` keep times). Why sampled and not a
full digest, and what that misses: docs/vllm.md (Namespace).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Bytes read at each sampled place, and how many places per large file.
SAMPLE_BYTES = 64 * 1024
SAMPLES = 16
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
#: Identities of directories whose files were unchanged (status and all) since they were sampled.
_KNOWN: dict[tuple[Path, tuple[tuple[str, int, int, int, int, int], ...]], Weights] = {}
_KNOWN_MAX = 256
_SETTLED_NS = 2_000_000_000


@dataclass(frozen=True)
class Weights:
    """What the identity hashes (``digest``) and what people read (``readable``)."""

    digest: str
    readable: dict[str, Any]


def local_weights(path: Path) -> Weights:
    """Every non-hidden file under ``path`` (or ``path`` itself, a single-file checkpoint such as
    a GGUF): relative name, size, modification time and sampled content. Directory links are not
    followed (no loops); file links are (a Hugging Face snapshot is links to its blobs).

    The samples are read again only when a file's status changed: its change time (``ctime``,
    which no tool can set back, unlike ``mtime``), inode, size or modification time."""
    files = [path] if path.is_file() else sorted(_files(path))
    stats = []
    for file in files:
        info = file.stat()
        name = file.name if file == path else file.relative_to(path).as_posix()
        stats.append((name, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev))
    key = (path, tuple(stats))
    if (known := _KNOWN.get(key)) is not None:
        return known
    weights = _sampled_weights(path, key[1])
    # A file changed within a clock tick of its last change may keep its ctime: remember only settled ones.
    if all(s[3] < time.time_ns() - _SETTLED_NS for s in stats):
        if len(_KNOWN) >= _KNOWN_MAX:
            _KNOWN.clear()
        _KNOWN[key] = weights
    return weights


def _sampled_weights(path: Path, stats: tuple[tuple[str, int, int, int, int, int], ...]) -> Weights:
    digest = hashlib.sha256(b"vua-s3 files/1\0")
    for name, size, mtime_ns, *_ in stats:  # the change time and inode are this host's: not hashed
        digest.update(f"{name}\0{size}\0{mtime_ns}\0".encode())
        digest.update(_sampled(path if name == path.name and path.is_file() else path / name, size))
    newest = max((s[2] for s in stats), default=0)
    readable = {
        "files": len(stats),
        "bytes": sum(s[1] for s in stats),
        "newest": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest / 1e9)),
    }
    return Weights(digest.hexdigest(), readable)


def hub_commit(repo_id: str, revision: str | None, cache_dir: str | None = None) -> str | None:
    """The commit ``revision`` (default: the main branch) of a hub repository resolved to in the
    local Hugging Face cache (``cache_dir``, default the hub client's), without a network
    request; ``None`` if it is not cached."""
    if revision and _COMMIT_RE.match(revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # no hub client: nothing was downloaded through it either
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision, cache_dir=cache_dir)
    except ValueError:  # not a repository id (a path that does not exist, a URL)
        return None
    if not isinstance(found, str):
        return None
    commit = Path(found).parent.name  # <cache>/models--org--name/snapshots/<commit>/config.json
    return commit if _COMMIT_RE.match(commit) else None


def weights_of(model: str, revision: str | None) -> Weights | None:
    """The weights behind vLLM's or transformers' ``model`` argument: a local path's files, or a
    hub repository's commit; ``None`` when neither can be read here."""
    path = Path(model).expanduser()
    if path.exists():
        return local_weights(path)
    commit = hub_commit(model, revision)
    if commit is None:
        return None
    return Weights(hashlib.sha256(f"vua-s3 hub/1\0{model}\0{commit}".encode()).hexdigest(), {"commit": commit})


def _files(root: Path) -> list[Path]:
    found = []
    for directory, subdirectories, names in os.walk(root):  # os.walk follows no directory links
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        for name in names:
            file = Path(directory, name)
            if not name.startswith(".") and file.is_file():  # a link to a file counts, a broken one not
                found.append(file)
    return found


def _sampled(file: Path, size: int) -> bytes:
    """The whole content of a small file, or ``SAMPLES`` slices of a large one (first and last included)."""
    digest = hashlib.sha256()
    with file.open("rb") as f:
        if size <= SAMPLE_BYTES * SAMPLES:
            digest.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLES - 1)
            for i in range(SAMPLES):
                f.seek(round(i * step))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.digest()
