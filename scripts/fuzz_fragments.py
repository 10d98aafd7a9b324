"""Fuzz the fragment reader with hostile objects: ``get_closest`` and ``lookup`` on mutated fragments.

Anyone who can write to the bucket or directory decides what the reader parses. This
stores a 3-group prompt in a POSIX directory (real files), then for each case replaces
one group's object with a mutation of a valid fragment (bit flips, truncations, garbage,
a lying header length, header JSON edits: huge or negative offsets, other dtypes and
shapes, duplicate names, non-UTF-8, deep nesting, another group's object) and checks:

* neither call raises (hostile data is a miss, never an error);
* the groups before the damaged one are returned, bit-exact;
* a damaged group that is returned holds exactly what ``safetensors`` reads from those
  bytes, and the groups after it are the original ones;
* ``lookup`` still counts every group (probing moves no data);
* memory stays bounded: the process's address space is capped at its warm size plus
  ``--headroom`` MiB, so any allocation sized from a header's claims fails the case.

Usage: ``python scripts/fuzz_fragments.py [--cases N] [--seed S] [--headroom MIB]``.
Prints the number of cases, what the reader did with them, and exits 1 on a failure
(hypothesis then prints the smallest failing case it found).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vua_s3 import VUA, VUAConfig

CFG = VUAConfig(split_factor=4, namespace="fuzz")
GROUPS = 3
LAYERS, HEADS, HEAD_DIM = 2, 1, 4  # one KV head: one object per group (format 2)
DTYPE = torch.bfloat16
TOKENS = torch.arange(GROUPS * CFG.split_factor, dtype=torch.int64) * 7919 + 11
DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL", "X", ""]
HOSTILE_INTS = [-(2**63), -(2**31), -1, 0, 1, 7, 8, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]


def hostile_values() -> st.SearchStrategy[object]:
    """Values a hostile header may put anywhere."""
    return st.one_of(
        st.sampled_from(HOSTILE_INTS),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        st.text(max_size=16),
        st.sampled_from(DTYPE_NAMES),
        st.lists(st.one_of(st.sampled_from(HOSTILE_INTS), st.integers(-4, 4096)), max_size=7),
        st.dictionaries(st.text(max_size=6), st.integers(-4, 99), max_size=3),
    )


def split(data: bytes) -> tuple[dict[str, object], bytes]:
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: object, body: bytes, text: bytes | None = None) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode() if text is None else text
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def header_edit(draw: st.DrawFn, data: bytes) -> bytes:
    """One field of the header JSON set to a hostile value (the data and its CRC intact)."""
    header, body = split(data)
    tensor = draw(st.sampled_from(["tokens", "kv"]))
    entry = header[tensor]
    assert isinstance(entry, dict)
    metadata = header["__metadata__"]
    assert isinstance(metadata, dict)
    target = draw(st.sampled_from(["dtype", "shape", "shape item", "offset", "entry", "metadata", "top", "drop"]))
    value = draw(hostile_values())
    if target in ("dtype", "shape"):
        entry[target] = value
    elif target == "shape item":
        entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = value
    elif target == "offset":
        entry["data_offsets"][draw(st.integers(0, 1))] = value
    elif target == "entry":
        entry[draw(st.text(max_size=12))] = value
    elif target == "metadata":
        metadata[draw(st.sampled_from([*metadata, "extra"]))] = value
    elif target == "top":
        header[draw(st.sampled_from(["tokens", "kv", "__metadata__", "other"]))] = value
    else:
        del header[draw(st.sampled_from(sorted(header)))]
    return join(header, body)


@st.composite
def reshaped(draw: st.DrawFn, data: bytes) -> bytes:
    """A self-consistent relabelling: another dtype and/or shape covering the same bytes."""
    header, body = split(data)
    entry = header["kv"]
    assert isinstance(entry, dict)
    begin, end = entry["data_offsets"]
    if draw(st.booleans()):  # what a reader would take: [layers, 2, heads, S, head_dim], 2-byte items
        entry["dtype"] = draw(st.sampled_from(["BF16", "F16", "I16"]))
        entry["shape"] = draw(st.sampled_from([[3, 2, 2, 4, 4], [2, 2, 3, 4, 4], [1, 2, 6, 4, 4], [2, 2, 1, 4, 12]]))
        return join(header, body)
    dtype_name = draw(st.sampled_from(["BF16", "F16", "I16", "F32", "I32", "F8_E4M3", "U8", "F64"]))
    itemsize = {"BF16": 2, "F16": 2, "I16": 2, "F32": 4, "I32": 4, "F8_E4M3": 1, "U8": 1, "F64": 8}[dtype_name]
    count = (end - begin) // itemsize
    dims = []
    for _ in range(draw(st.integers(1, 5)) - 1):
        divisors = [d for d in range(1, min(count, 64) + 1) if count % d == 0]
        dims.append(draw(st.sampled_from(divisors)))
        count //= dims[-1]
    entry["dtype"], entry["shape"] = dtype_name, [*dims, count]
    return join(header, body)


@st.composite
def raw_edit(draw: st.DrawFn, data: bytes) -> bytes:
    """Textual header damage: a duplicated name, non-UTF-8 bytes, deep nesting, padding."""
    (length,) = struct.unpack_from("<Q", data)
    text, body = data[8 : 8 + length], data[8 + length :]
    kind = draw(st.sampled_from(["duplicate", "non-utf8", "nesting", "padding", "utf16"]))
    if kind == "duplicate":
        header = json.loads(text)
        name = draw(st.sampled_from(["tokens", "kv", "__metadata__"]))
        other = draw(st.sampled_from([header[name], header["tokens"], header["kv"], {}]))
        pair = f'"{name}":{json.dumps(other, separators=(",", ":"))}'.encode()
        text = b"{" + pair + b"," + text.strip()[1:] if draw(st.booleans()) else text.strip()[:-1] + b"," + pair + b"}"
    elif kind == "non-utf8":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff"])) + text[at:]
        )
    elif kind == "nesting":
        depth = draw(st.sampled_from([10, 1000, 5000, 30000, 40000]))
        at = text.index(b'"shape":') + len(b'"shape":')
        close = text.index(b"]", at) + 1
        text = text[:at] + b"[" * depth + b"1" + b"]" * depth + text[close:]
    elif kind == "padding":
        text = text + b" " * draw(st.integers(1, 70000))
    else:
        text = json.dumps(json.loads(text)).encode("utf-16")
    return join(None, body, text)


@st.composite
def mutation(draw: st.DrawFn, originals: list[bytes]) -> tuple[int, bytes]:
    """Which group is replaced, and by what."""
    group = draw(st.integers(0, GROUPS - 1))
    data = originals[group]
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "garbage", "length", "edit", "reshape", "raw", "swap"]))
    if kind == "flip":
        out = bytearray(data)
        for bit in draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=8)):
            out[bit // 8] ^= 1 << (bit % 8)
        return group, bytes(out)
    if kind == "truncate":
        return group, data[: draw(st.integers(0, len(data) - 1))]
    if kind == "extend":
        return group, data + draw(st.binary(min_size=1, max_size=64))
    if kind == "garbage":
        return group, draw(st.binary(max_size=2048))
    if kind == "length":
        (length,) = struct.unpack_from("<Q", data)
        claim = draw(st.one_of(st.sampled_from([0, 1, length - 1, length + 1, len(data), 2**63, 2**64 - 1])))
        return group, struct.pack("<Q", claim) + data[8:]
    if kind == "edit":
        return group, draw(header_edit(data))
    if kind == "reshape":
        return group, draw(reshaped(data))
    if kind == "raw":
        return group, draw(raw_edit(data))
    return group, originals[draw(st.sampled_from([g for g in range(GROUPS) if g != group]))]


def reference(data: bytes) -> dict[str, torch.Tensor] | None:
    """What the safetensors library reads from ``data``; ``None`` where it refuses."""
    try:
        return safetensors.torch.load(data)
    except Exception:
        return None


def group_of(res_data: list[tuple[torch.Tensor, torch.Tensor]], group: int) -> torch.Tensor:
    """Group ``group`` of a result as the fragment's ``[layers, 2, heads, S, head_dim]``."""
    size = CFG.split_factor
    return torch.stack(
        [
            torch.stack([k[0, :, group * size : (group + 1) * size], v[0, :, group * size : (group + 1) * size]])
            for k, v in res_data
        ]
    )


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


class Fuzzer:
    def __init__(self, root: Path) -> None:
        gen = torch.Generator().manual_seed(0)
        shape = (1, HEADS, TOKENS.numel(), HEAD_DIM)
        self.kv = [
            (torch.randn(shape, generator=gen).to(DTYPE), torch.randn(shape, generator=gen).to(DTYPE))
            for _ in range(LAYERS)
        ]
        self.vua = VUA(CFG, root)
        self.vua.put(TOKENS, self.kv)
        self.paths = [root / key for key in CFG.tokens_to_paths(TOKENS)]
        self.originals = [path.read_bytes() for path in self.paths]
        self.stored = [group_of(self.kv, g) for g in range(GROUPS)]
        self.outcomes: collections.Counter[str] = collections.Counter()

    def case(self, group: int, data: bytes) -> None:
        path = self.paths[group]
        path.write_bytes(data)  # the hostile writer
        try:
            res = self.vua.get_closest(TOKENS)
            stored = self.vua.lookup(TOKENS)
        finally:
            path.write_bytes(self.originals[group])
        assert stored == TOKENS.numel(), f"lookup counted {stored} tokens; every object is present"
        got = 0 if res is None else res.tokens.numel() // CFG.split_factor
        assert got >= group, f"{got} groups returned; the {group} before the damaged one are intact"
        if res is None or got == group:
            self.outcomes["prefix ended at the damaged group"] += 1
            return
        assert torch.equal(res.tokens, TOKENS[: got * CFG.split_factor])
        for g in range(got):
            if g != group:
                assert same(group_of(res.data, g), self.stored[g]), f"group {g} differs from what was stored"
        ref = reference(data)
        assert ref is not None, "the reader accepted an object safetensors refuses"
        assert same(group_of(res.data, group), ref["kv"]), "the damaged group returned data other than its bytes hold"
        assert torch.equal(ref["tokens"], TOKENS[group * CFG.split_factor : (group + 1) * CFG.split_factor])
        kept = same(group_of(res.data, group), self.stored[group])
        self.outcomes["damaged group accepted" + (" (same data)" if kept else " (its own bytes)")] += 1


def cap_address_space(headroom: int) -> int:
    """Limit the address space to what the warm process has plus ``headroom`` bytes."""
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, hard))
    try:
        torch.empty(2 * headroom, dtype=torch.uint8)
    except RuntimeError:
        return size + headroom
    raise AssertionError("the address-space cap does not stop an allocation of twice the headroom")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--headroom", type=int, default=256, help="MiB of address space allowed beyond the warm process"
    )
    args = parser.parse_args()
    if os.environ.get("MALLOC_ARENA_MAX") != "2":
        # Each thread's malloc arena reserves 64 MiB of address space: the cap must count
        # allocations, not arenas.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_ARENA_MAX": "2"})
    logging.disable(logging.WARNING)  # every rejected case logs a warning; the counts say it
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="vua-fuzz-") as root:
        fuzzer = Fuzzer(Path(root))
        for _ in range(20):
            fuzzer.case(0, fuzzer.originals[0])  # warm: threads, buffers, caches
        fuzzer.outcomes.clear()
        limit = cap_address_space(args.headroom << 20)
        count = 0

        @settings(
            max_examples=args.cases,
            database=None,
            deadline=None,
            derandomize=False,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(mutation(fuzzer.originals))
        def run(case: tuple[int, bytes]) -> None:
            nonlocal count
            count += 1
            fuzzer.case(*case)

        from hypothesis import seed

        started = time.monotonic()
        failed = None
        try:
            seed(args.seed)(run)()
        except Exception as exc:
            failed = exc
        elapsed = time.monotonic() - started
        fuzzer.vua.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"{count} cases in {elapsed:.0f} s, address space capped at {limit >> 20} MiB, peak RSS {peak} MiB")
    for outcome, n in fuzzer.outcomes.most_common():
        print(f"  {n:7d}  {outcome}")
    if failed is not None:
        print(f"FAILED: {failed!r}")
        return 1
    print("0 failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
