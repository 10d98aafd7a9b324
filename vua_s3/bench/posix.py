"""POSIX comparisons for the bench: the raw file floors and the original VUA.

File floors: the same objects written with one ``write`` and an ``fsync`` each, and read
with ``readinto`` into one fresh tensor of the full size, all on one thread (the kernel's
copy is the cost). The original VUA (github.com/vast-data/VUA, ``vua.core``) is
re-implemented here from its storage approach, not copied: a thread per group; put
slices and clones every K and V, stacks them, serializes with ``tobytes`` into a
safetensors-style blob and writes ``_data``/``_tokens`` files (write + fsync) into a
directory renamed into place; get_closest reads both files whole, wraps them in tensors,
and concatenates the groups per layer. Its ``pin_memory()`` before the device copy is
skipped without CUDA (it raises there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config import VUAConfig
from ..fragment import dtype_name, dtype_of
from ..sync import VUA
from .report import Sample


def file_put(root: str, keys: Sequence[str], bodies: Sequence[bytes]) -> None:
    for key, body in zip(keys, bodies, strict=True):
        fd = os.open(os.path.join(root, key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def file_get(root: str, keys: Sequence[str], sizes: Sequence[int]) -> torch.Tensor:
    out = torch.empty(sum(sizes), dtype=torch.uint8)
    view, position = out.numpy().data, 0
    for key, size in zip(keys, sizes, strict=True):
        with open(os.path.join(root, key), "rb", buffering=0) as file:
            filled = 0
            while filled < size:
                n = file.readinto(view[position + filled : position + size])
                if not n:
                    raise OSError(f"{key} is shorter than {size} bytes")
                filled += n
        position += size
    return out


class OriginalVUA:
    """The original VUA's POSIX storage, re-implemented (see the module docstring)."""

    def __init__(self, root: str, split_factor: int) -> None:
        self._root = root
        self._split = split_factor

    def _paths(self, tokens: torch.Tensor) -> list[str]:
        """Its key scheme: SHA-1 chained over the hex tokens of each prefix."""
        values = tokens.tolist()
        paths, previous = [], ""
        for end in range(self._split, len(values) + 1, self._split):
            digest = hashlib.sha1((previous + ",".join(format(t, "x") for t in values[:end])).encode()).hexdigest()
            previous = f"hash:{digest}:"
            paths.append(digest)
        return paths

    def put(self, tokens: torch.Tensor, data: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        paths = self._paths(tokens)

        def save(group: int, name: str) -> None:
            directory = os.path.join(self._root, name)
            if os.path.exists(directory):
                return
            staging = directory + ".tmp"
            os.makedirs(staging, exist_ok=True)
            start, stop = group * self._split, (group + 1) * self._split
            layers = [torch.stack([t[:, :, start:stop, :].clone() for t in layer]) for layer in data]
            blob = _to_bytes(torch.stack(layers), name + ".data")
            token_blob = _to_bytes(tokens[start:stop].clone(), name + ".tokens")
            for file_name, content in (("_data.safetensors", blob), ("_tokens.safetensors", token_blob)):
                fd = os.open(os.path.join(staging, file_name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as file:
                    file.write(content)
                    os.fsync(fd)
            os.rename(staging, directory)

        _threads(save, list(enumerate(paths)))

    def get_closest(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        paths = self._paths(tokens)
        found: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def load(group: int, name: str) -> None:
            directory = os.path.join(self._root, name)
            try:
                with open(os.path.join(directory, "_tokens.safetensors"), "rb") as file:
                    group_tokens = _from_bytes(file.read(), name + ".tokens")
                with open(os.path.join(directory, "_data.safetensors"), "rb") as file:
                    group_data = _from_bytes(file.read(), name + ".data")
            except FileNotFoundError:
                return
            found.append((group, group_tokens, group_data))

        _threads(load, list(enumerate(paths)))
        if not found:
            return None
        found.sort(key=lambda item: item[0])
        groups = [data for _, _, data in found]  # .pin_memory().to(device) in the original
        return [
            (torch.cat([g[layer][0] for g in groups], dim=2), torch.cat([g[layer][1] for g in groups], dim=2))
            for layer in range(len(groups[0]))
        ]


def _threads(work: Callable[[int, str], None], items: list[tuple[int, str]]) -> None:
    threads = [threading.Thread(target=work, args=item) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _to_bytes(tensor: torch.Tensor, name: str) -> bytes:
    """Its serializer: a JSON header, then the tensor's bytes via ``numpy().tobytes()``."""
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    dtype = dtype_name(tensor.dtype)
    meta = json.dumps({name: {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [0, len(raw)]}}).encode()
    meta += b" " * (-len(meta) % 8)
    return struct.pack("<Q", len(meta)) + meta + tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _from_bytes(blob: bytes, name: str) -> torch.Tensor:
    (size,) = struct.unpack("<Q", blob[:8])
    info = json.loads(blob[8 : 8 + size])[name]
    start, stop = info["data_offsets"]
    payload = blob[8 + size + start : 8 + size + stop]  # a bytes slice: a copy, as in the original
    return torch.frombuffer(bytearray(payload), dtype=dtype_of(info["dtype"])).reshape(info["shape"])


def measure_posix(
    cfg: VUAConfig,
    tokens: torch.Tensor,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    whole: list[bytes],
    sizes: list[int],
    where: tuple[str | None, int],
    timed: Callable[..., Any],
    cold: Callable[[str, str], Sample] | None,
    checks: dict[str, Any],
) -> tuple[str, list[Sample]]:
    """vua_s3 on a POSIX directory beside the file floors and the original VUA, same KV;
    ``where``: the directory to make the store's in (``None``: /dev/shm, else the temp
    dir) and the repeats. ``cold(location, salt)`` measures a new process's get. Returns
    the directory and the cold samples."""
    directory, repeats = where
    parent = directory or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    colds: list[Sample] = []
    root = tempfile.mkdtemp(prefix="vua-s3-bench-posix-", dir=parent)
    rows = list(tokens.unbind(0))
    try:
        floor_keys = [f"floor-{i}" for i in range(len(sizes))]
        with VUA(cfg, os.path.join(root, "vua")) as vua:
            for rep in range(repeats):
                salt = f"posix-r{rep}"
                original = OriginalVUA(os.path.join(root, f"original-{rep}"), cfg.split_factor)
                os.makedirs(os.path.join(root, f"original-{rep}"))
                vua.forget_known()
                timed("posixvua_put", vua.put, tokens, kv, salt=salt)
                timed("posixfloor_put", file_put, root, floor_keys, whole)
                timed("original_put", original_put, original, rows, kv)
                vua.forget_known()
                got = timed("posixvua_get", vua.get_closest, rows, "cpu", salt=salt)
                checks["posix_get_tokens"] = sum(0 if g is None else g.tokens.numel() for g in got)
                del got
                timed("posixfloor_get", file_get, root, floor_keys, sizes)
                if cold is not None:
                    colds.append(cold(os.path.join(root, "vua"), salt))
                loaded = timed("original_get", original_get, original, rows)
                checks["original_get_tokens"] = sum(x[0][0].size(2) if x else 0 for x in loaded)
                del loaded
                shutil.rmtree(os.path.join(root, f"original-{rep}"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return parent, colds


def original_put(original: OriginalVUA, rows: list[torch.Tensor], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for row, sequence in enumerate(rows):
        original.put(sequence, [(k[row : row + 1], v[row : row + 1]) for k, v in kv])


def original_get(original: OriginalVUA, rows: list[torch.Tensor]) -> list[Any]:
    return [original.get_closest(row) for row in rows]
