"""Hostile fragments: objects anyone with write access could plant, read through the real reader.

One object per kind of damage the reader must survive. Those marked "found" are bugs
``scripts/fuzz_fragments.py`` found in the first decoder: it raised TypeError, KeyError,
AttributeError, ValueError or RecursionError out of ``get_closest`` (every query on that
prefix failed), or accepted a header safetensors refuses. The last test is a short run of
the fuzzer itself, with its address-space cap.
"""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache

from vua_s3 import VUA, VUAConfig
from vua_s3.errors import FragmentError
from vua_s3.fragment import MAX_HEADER_BYTES, decode

CFG = VUAConfig(split_factor=4)
TOKENS = torch.arange(12) * 31 + 5
KV = random_kvcache(seq_len=12)
REPO = Path(__file__).parents[1]


def _parts(data: bytes) -> tuple[dict[str, object], bytes]:
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(text: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text + body


def _edit(data: bytes, path: tuple[str | int, ...], value: object) -> bytes:
    header, body = _parts(data)
    node: Any = header
    for name in path[:-1]:
        node = node[name]
    node[path[-1]] = value
    return _join(json.dumps(header).encode(), body)


def _nested(data: bytes, depth: int) -> bytes:
    (length,) = struct.unpack_from("<Q", data)
    text = data[8 : 8 + length].replace(b'"shape":[', b'"shape":' + b"[" * depth + b"[", 1)
    text = text.replace(b"]", b"]" + b"]" * depth, 1)
    return _join(text, data[8 + length :])


def _duplicated(data: bytes) -> bytes:
    header, body = _parts(data)
    text = json.dumps(header).encode()
    return _join(b'{"kv":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},' + text[1:], body)


HOSTILE = {
    "found: negative offset": lambda d: _edit(d, ("kv", "data_offsets", 0), -(2**63)),
    "found: missing shape": lambda d: _edit(d, ("kv", "shape"), None),
    "found: shape of floats": lambda d: _edit(d, ("tokens", "shape"), [4.0]),
    "found: inferred shape": lambda d: _edit(d, ("kv", "shape"), [-1, 2, 2, 4, 8]),
    "found: shape past int64": lambda d: _edit(d, ("kv", "shape"), [2**64, 0, 2, 4, 8]),
    "found: unhashable dtype": lambda d: _edit(d, ("kv", "dtype"), ["F16"]),
    "tokens as float64": lambda d: _edit(d, ("tokens", "dtype"), "F64"),
    "found: metadata not a map": lambda d: _edit(d, ("__metadata__",), 7),
    "found: entry not a map": lambda d: _edit(d, ("tokens",), 7),
    "found: deep nesting": lambda d: _nested(d, 20_000),
    "duplicate names": _duplicated,
    "huge offset": lambda d: _edit(d, ("kv", "data_offsets", 1), 2**63),
    "non-UTF-8 header": lambda d: d[:8] + b"\xff" + d[9:],
    "header longer than the file": lambda d: struct.pack("<Q", len(d)) + d[8:],
    "header length past the limit": lambda d: struct.pack("<Q", MAX_HEADER_BYTES + 8) + d[8:] + bytes(MAX_HEADER_BYTES),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_fragment_ends_the_prefix(tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str) -> None:
    """Group 1 is replaced by a hostile object: group 0 comes back exactly, lookup still
    counts every group, and the warning names the object."""
    with VUA(CFG, tmp_path) as vua:
        vua.put(TOKENS, KV)
        path = tmp_path / CFG.tokens_to_paths(TOKENS)[1]
        hostile = HOSTILE[name](path.read_bytes())
        with pytest.raises(FragmentError):
            decode(bytearray(hostile))
        path.write_bytes(hostile)
        with caplog.at_level(logging.WARNING, logger="vua_s3"):
            res = vua.get_closest(TOKENS)
        assert res is not None and torch.equal(res.tokens, TOKENS[:4])
        assert_kv_equal(res.data, [(k[:, :, :4], v[:, :, :4]) for k, v in KV])
        assert vua.lookup(TOKENS) == 12
    assert any(path.name in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)


def test_fuzz_short_run() -> None:
    """The fuzzer, briefly: no case may raise, return other data, or allocate past its cap."""
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fuzz_fragments.py"), "--cases", "400", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "400 cases" in run.stdout and "0 failures" in run.stdout
