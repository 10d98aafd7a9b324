"""One stored object: a safetensors file holding one KV head of one group, all layers.

Layout, format version 2 (readable by ``safetensors.torch.load``)::

    tokens  int64 [S]                               the group's token ids
    kv      <dtype> [layers, 2, 1, S, head_dim]     K (index 0) and V (index 1) of one KV head
    __metadata__: format, version, namespace, split_factor, group, digest, parent,
                  [identity,] head, kv_heads, crc32c (or crc32)

One KV head per object, so a tensor-parallel rank of any size writes and reads exactly
its heads (``shards.py``). ``head`` and ``kv_heads`` say which head of how many this is
and are checked on read like the group and digest. ``identity``, present when the writer
named one, is a digest of everything that changes the K/V bytes of the model (the
integrations derive it): two deployments that typed the same namespace for different
models still never read each other's objects. ``docs/format.md`` states every field. The head index is zero-padded to
the width of the largest, so all objects of a group have one size: a reader that knows
the layout computes it (:func:`encoded_size`) and one probe's size serves every head.
Version 1 objects (``kv [layers, 2, heads, S, head_dim]``, every head in one) are
refused by :func:`decode`.

Encoding gives the header and views of the caller's tensors (sent as they are, no
serialization copy); decoding returns views into the received buffer. ``crc32c``
covers the data section, so flipped bytes are caught even where the transport
checks nothing: CRC-32C because CPUs compute it in hardware (awscrt's implementation),
several times faster than zlib's CRC-32. Objects whose metadata has ``crc32`` instead
(written before, or without awscrt) are checked with zlib.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch

from .errors import FragmentError

FORMAT = "vua_s3/fragment"
VERSION = "2"

#: The safetensors name of every dtype a fragment can hold.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
}
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_HEADER_ALIGN = 8
#: A fragment header is under a KiB; anything much longer is not one, and is not parsed.
MAX_HEADER_BYTES = 1 << 16

try:
    from awscrt.checksums import crc32c as _crc32c
except ImportError:  # installed without its dependencies: objects get zlib's CRC-32
    _crc32c = None

_CRC: Callable[[Any, int], int] = zlib.crc32 if _crc32c is None else _crc32c
_CRC_KEY = "crc32" if _crc32c is None else "crc32c"
"""The checksum this process writes, and its metadata key."""


KVCache = Sequence[tuple[torch.Tensor, torch.Tensor]]
_Entries = dict[str, tuple[torch.dtype, list[int], int]]
"""Each tensor's dtype, shape and offset in the data section."""


@dataclass(frozen=True)
class Fragment:
    """A decoded fragment: views into the buffer it was read from."""

    tokens: torch.Tensor
    kv: torch.Tensor
    """``[layers, 2, 1, S, head_dim]``."""
    metadata: dict[str, str]
    head: int
    kv_heads: int


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype, or a clear error for unsupported ones."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"KV dtype {dtype} cannot be stored; use one of {sorted(map(str, DTYPE_NAMES))}") from None


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``KeyError`` for names fragments never hold)."""
    return _DTYPES[name]


def group_metadata(
    namespace: str, split_factor: int, group: int, digest: bytes, parent: bytes | None, identity: str = ""
) -> dict[str, str]:
    """The metadata that binds a fragment to one group of one prefix and, with a non-empty
    ``identity``, to one model identity (checked by :func:`check_group`)."""
    metadata = {
        "namespace": namespace,
        "split_factor": str(split_factor),
        "group": str(group),
        "digest": digest.hex(),
        "parent": parent.hex() if parent else "",
    }
    if identity:
        metadata["identity"] = identity
    return metadata


def check_group(frag: Fragment, expected: dict[str, str], tokens: torch.Tensor, head: int) -> None:
    """Raise :class:`FragmentError` unless ``frag`` carries the ``expected`` group metadata
    (:func:`group_metadata`; an absent identity is the empty one), is KV head ``head`` and
    holds ``tokens``, the query's tokens of that group."""
    meta = frag.metadata
    for name in ("namespace", "split_factor", "group", "digest"):  # parent: the digest binds the prefix
        if meta.get(name) != expected[name]:
            raise FragmentError(f"metadata {name}={meta.get(name)!r}, expected {expected[name]!r}")
    if meta.get("identity", "") != expected.get("identity", ""):
        raise FragmentError(
            f"written by another model identity ({meta.get('identity', '')!r}, expected "
            f"{expected.get('identity', '')!r}): a namespace shared by different models"
        )
    if frag.head != head:
        raise FragmentError(f"object holds KV head {frag.head}, expected head {head}")
    split_factor = int(expected["split_factor"])
    if frag.kv.size(3) != split_factor:
        raise FragmentError(f"kv tensor has shape {list(frag.kv.shape)}, expected [layers, 2, 1, {split_factor}, dim]")
    if not torch.equal(frag.tokens, tokens):
        raise FragmentError("stored tokens differ from the query's tokens")


class Encoder:
    """Objects of one row of a kvcache, encoded as views of its memory.

    Built once per write of a row: where a tensor's memory already holds each head's
    tokens contiguously (the usual ``[b, heads, n, head_dim]``), it keeps one byte view of
    that memory, so each object's segments are plain slices of it and no tensor
    operation runs per segment. Other host layouts are staged through one contiguous copy
    per segment. Device tensors are copied to host memory (pinned for CUDA) once, the
    whole row at the first encode: one copy per layer and K or V, not one per object.
    The views are valid while the caller's tensors are unchanged.
    """

    def __init__(self, kvcache: KVCache, row: int, *, first_head: int = 0) -> None:
        first_key = kvcache[0][0]
        self._kvcache = kvcache
        self._row = row
        self._first_head = first_head
        self._held = first_key.size(1)
        self._layout = (len(kvcache), first_key.size(3), first_key.dtype)
        self._needs_host = first_key.device.type != "cpu"
        self._sources: list[torch.Tensor] | None = None
        self._memory: list[tuple[memoryview, int, int, int] | None] = []
        self._staging = threading.Lock()
        if not self._needs_host:
            self._sources = [source[row] for layer in kvcache for source in layer]
            self._memory = [_strided_memory(source) for source in self._sources]

    @property
    def needs_host_copy(self) -> bool:
        """Whether encoding copies from a device (a blocking copy: run it off the event loop)."""
        return self._needs_host

    def _host_sources(self) -> tuple[list[torch.Tensor], list[tuple[memoryview, int, int, int] | None]]:
        """The row's K and V per layer in host memory, copied from the device on first use."""
        with self._staging:
            if self._sources is None:
                device = self._kvcache[0][0].device
                pinned = device.type == "cuda"
                hosts = []
                for layer in self._kvcache:
                    for source in layer:
                        host = torch.empty(source[self._row].shape, dtype=source.dtype, pin_memory=pinned)
                        host.copy_(source[self._row], non_blocking=pinned)
                        hosts.append(host)
                if pinned:  # runs only on a GPU: docs/gpu.md
                    torch.cuda.current_stream(device).synchronize()
                self._memory = [_strided_memory(host) for host in hosts]
                self._sources = hosts
            return self._sources, self._memory

    def encode(
        self, start: int, tokens: torch.Tensor, metadata: dict[str, str], *, head: int, kv_heads: int
    ) -> list[memoryview]:
        """The object of KV head ``head`` (of ``kv_heads``) for tokens ``[start,
        start+len(tokens))``, as the buffers that make it up in order: the header, then the data."""
        num_tokens = tokens.numel()
        local = head - self._first_head
        if not 0 <= head < kv_heads or not 0 <= local < self._held:
            raise ValueError(
                f"head {head} of {kv_heads} is not among the {self._held} heads held from head {self._first_head}"
            )
        end = start + num_tokens
        data = [_bytes(tokens.to("cpu", torch.int64))]
        sources, memories = self._host_sources()
        for memory, source in zip(memories, sources, strict=True):
            if memory is None:
                data.extend(_views(source[local : local + 1, start:end, :]))
            else:
                view, first, head_step, token_step = memory
                offset = first + local * head_step + start * token_step
                data.append(view[offset : offset + num_tokens * token_step])
        crc = 0
        for segment in data:
            crc = _CRC(segment, crc)
        layers, head_dim, dtype = self._layout
        header = _header(
            layers, num_tokens, head_dim, dtype, {**metadata, **_head_metadata(head, kv_heads), _CRC_KEY: f"{crc:08x}"}
        )
        return [memoryview(header), *data]


def encoded_size(
    layers: int, tokens: int, head_dim: int, dtype: torch.dtype, metadata: dict[str, str], *, head: int, kv_heads: int
) -> int:
    """The exact size of the object :meth:`Encoder.encode` makes for this layout and
    metadata: a reader that knows the layout fetches an object without probing it."""
    header = _header(layers, tokens, head_dim, dtype, {**metadata, **_head_metadata(head, kv_heads), _CRC_KEY: "0" * 8})
    return len(header) + tokens * 8 + layers * 2 * tokens * head_dim * dtype.itemsize


def _head_metadata(head: int, kv_heads: int) -> dict[str, str]:
    return {"head": f"{head:0{len(str(kv_heads - 1))}d}", "kv_heads": str(kv_heads)}


def _header(layers: int, tokens: int, head_dim: int, dtype: torch.dtype, metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header of an object (``kv`` is ``[layers, 2, 1, S, head_dim]``)."""
    tokens_bytes = tokens * 8
    kv_bytes = layers * 2 * tokens * head_dim * dtype.itemsize
    header = {
        "tokens": {"dtype": "I64", "shape": [tokens], "data_offsets": [0, tokens_bytes]},
        "kv": {
            "dtype": dtype_name(dtype),
            "shape": [layers, 2, 1, tokens, head_dim],
            "data_offsets": [tokens_bytes, tokens_bytes + kv_bytes],
        },
        "__metadata__": {**metadata, "format": FORMAT, "version": VERSION},
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % _HEADER_ALIGN)
    return struct.pack("<Q", len(header_bytes)) + header_bytes


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (keeps the tensor alive)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data


def _check_crc(metadata: dict[str, str], data: memoryview) -> None:
    """Raise :class:`FragmentError` unless the data section has the checksum its metadata names."""
    if "crc32c" in metadata:
        if _crc32c is None:
            raise FragmentError("object has a crc32c checksum and awscrt, which computes it, is not installed")
        stored, computed = metadata["crc32c"], f"{_crc32c(data):08x}"
    else:
        stored, computed = metadata.get("crc32", "none"), f"{zlib.crc32(data):08x}"
    if stored != computed:
        raise FragmentError(f"checksum mismatch: stored {stored!r}, computed {computed!r}")


def _strided_memory(block: torch.Tensor) -> tuple[memoryview, int, int, int] | None:
    """For a CPU ``block`` ([heads, n, head_dim]) whose heads each hold their tokens
    contiguously: a byte view of its storage, the byte offset of head 0 token 0, and the
    byte steps between heads and between tokens; else ``None``."""
    if block.device.type != "cpu" or block.stride(2) != 1 or block.stride(1) != block.size(2):
        return None
    item = block.element_size()
    memory = torch.empty(0, dtype=torch.uint8).set_(block.untyped_storage()).numpy().data
    return memory, int(block.storage_offset()) * item, block.stride(0) * item, block.stride(1) * item


def _views(block: torch.Tensor) -> list[memoryview]:
    """``block`` ([heads, S, head_dim], host memory) as few byte views as its memory allows."""
    if block.is_contiguous():
        return [_bytes(block)]
    heads, tokens, head_dim = block.shape
    if block.stride(2) != 1 or block.stride(1) != head_dim:
        return [_bytes(block.contiguous())]
    # Each head's [S, head_dim] is contiguous: slice one view of the whole storage.
    memory = torch.empty(0, dtype=torch.uint8).set_(block.untyped_storage()).numpy().data
    item = block.element_size()
    first, step, length = block.storage_offset() * item, block.stride(0) * item, tokens * head_dim * item
    return [memory[first + h * step : first + h * step + length] for h in range(heads)]


def decode(buf: bytearray | memoryview) -> Fragment:
    """Parse and integrity-check a fragment; raise :class:`FragmentError` if it is unusable.

    Anyone with write access to the store can put any bytes under a key, so every field
    is checked before it is used: the header is bounded, every offset and shape must
    agree with the object's own size, and nothing is allocated from what the header
    claims (the tensors are views of ``buf``).
    """
    view = memoryview(buf)
    if len(view) < 8:
        raise FragmentError(f"object is {len(view)} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack_from("<Q", view, 0)
    if header_len > MAX_HEADER_BYTES:
        raise FragmentError(
            f"header claims {header_len} bytes, more than a fragment header can have ({MAX_HEADER_BYTES})"
        )
    data_start = 8 + header_len
    if data_start > len(view):
        raise FragmentError(f"header claims {header_len} bytes but the object has {len(view)}")
    try:
        header = json.loads(bytes(view[8:data_start]).decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise FragmentError(f"unreadable fragment header ({exc!r})") from None
    metadata, entries = _check_header(header, len(view) - data_start)
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise FragmentError(
            f"not a version {VERSION} fragment (format={metadata.get('format')!r}, version={metadata.get('version')!r})"
        )
    _check_crc(metadata, view[data_start:])
    tensors = {
        name: torch.frombuffer(buf, dtype=dtype, offset=data_start + begin, count=math.prod(shape)).view(shape)
        for name, (dtype, shape, begin) in entries.items()
    }
    kv = tensors["kv"]
    try:
        head, kv_heads = int(metadata["head"]), int(metadata["kv_heads"])
    except (KeyError, ValueError) as exc:
        raise FragmentError(f"metadata has no usable head/kv_heads ({exc!r})") from None
    if not 0 <= head < kv_heads or kv.dim() != 5 or kv.size(1) != 2 or kv.size(2) != 1:
        raise FragmentError(f"head {head} of {kv_heads} with kv shape {list(kv.shape)}: not one KV head")
    return Fragment(tokens=tensors["tokens"], kv=kv, metadata=metadata, head=head, kv_heads=kv_heads)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names a key twice is ambiguous (readers differ on which wins)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError(f"duplicate names in {[key for key, _ in pairs]}")
    return found


def _check_header(header: object, data_len: int) -> tuple[dict[str, str], _Entries]:
    """The metadata and each tensor's dtype, shape and start, once they describe exactly
    ``data_len`` bytes: ``tokens`` (int64, 1-D) first, then ``kv``, back to back."""
    if not isinstance(header, dict) or set(header) != {"tokens", "kv", "__metadata__"}:
        names = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise FragmentError(f"header must hold exactly tokens, kv and __metadata__, got {names}")
    metadata = header["__metadata__"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FragmentError("header __metadata__ must map names to strings")
    entries: _Entries = {}
    offset = 0
    for name in ("tokens", "kv"):
        entry = header[name]
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FragmentError(f"tensor {name!r} must have exactly dtype, shape and data_offsets, got {entry!r:.200}")
        dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        shape, offsets = entry["shape"], entry["data_offsets"]
        if dtype is None or (name == "tokens" and dtype != torch.int64):
            raise FragmentError(f"tensor {name!r} has unsupported dtype {entry['dtype']!r:.100}")
        if not _ints(shape) or not all(size > 0 for size in shape) or (name == "tokens" and len(shape) != 1):
            raise FragmentError(f"tensor {name!r} has an invalid shape {shape!r:.200}")
        if not _ints(offsets) or len(offsets) != 2 or offsets[0] != offset:
            raise FragmentError(f"tensor {name!r} has invalid data_offsets {offsets!r:.200}, expected [{offset}, end]")
        size = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != size:
            raise FragmentError(f"tensor {name!r} of shape {shape} is {size} bytes but data_offsets span {offsets}")
        entries[name] = (dtype, shape, offset)
        offset = offsets[1]
    if offset != data_len:
        raise FragmentError(f"data section is {data_len} bytes, header expects {offset}")
    return metadata, entries


def _ints(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(item) is int for item in value)
