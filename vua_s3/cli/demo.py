"""``vua-s3 demo``: the whole path on a synthetic KV cache of a real model's shape, verified."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from ..bench.report import describe_machine
from ..config import DEFAULT_SPLIT_FACTOR, VUAConfig
from ..shapes import PRESETS
from ..storage import Store
from ..sync import VUA
from ..testing.errors import ServerNotFoundError
from .args import human_size, positive_int

_T = TypeVar("_T")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="store, probe, fetch and verify a synthetic KV cache")
    p.add_argument("--url", help="store location (default: an embedded S3 server on 127.0.0.1)")
    p.add_argument("--model", choices=sorted(PRESETS), default="llama3-8b", help="KV shape preset")
    p.add_argument("--tokens", type=positive_int, default=2048, help="prompt length (trimmed to the split factor)")
    p.add_argument("--split-factor", type=positive_int, default=DEFAULT_SPLIT_FACTOR, help="tokens per stored group")
    p.set_defaults(func=demo)


def _timed(fn: Callable[[], _T]) -> tuple[_T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@contextlib.contextmanager
def _demo_store(url: str | None) -> Iterator[Store | str]:
    """The store the demo runs on: the given URL, or an embedded S3 server it starts."""
    if url:
        yield url
        return
    try:
        from ..testing.moto import EmbeddedS3

        server = EmbeddedS3()
    except ServerNotFoundError as exc:
        with tempfile.TemporaryDirectory(prefix="vua-s3-demo-") as directory:
            print(f"{exc}; running on a temporary POSIX directory instead: {directory}")
            yield directory
        return
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with server:
        print(f"embedded S3 server (moto) on {server.endpoint_url}, bucket {server.bucket}")
        yield server.store("demo")


def demo(args: argparse.Namespace) -> int:
    """Store a synthetic KV cache of a real model's shape, probe, fetch and verify it."""
    shape = PRESETS[args.model]
    cfg = VUAConfig(split_factor=args.split_factor, namespace=f"demo-{shape.name}")
    tokens = torch.randint(0, 128_000, (args.tokens,), generator=torch.Generator().manual_seed(1))
    tokens = cfg.trim_to_split_factor(tokens)
    n = tokens.numel()
    if n == 0:
        print(f"--tokens must be at least --split-factor ({args.split_factor})", file=sys.stderr)
        return 2
    kv = shape.random_kvcache(n)
    kv_bytes = shape.bytes_per_token * n
    groups = n // cfg.split_factor
    print(
        f"model shape {shape.name}: {shape.layers} layers, {shape.kv_heads} KV heads, head_dim {shape.head_dim}, "
        f"{str(shape.dtype).removeprefix('torch.')}; {n} tokens = {groups} groups of {cfg.split_factor}, "
        f"{human_size(kv_bytes)} of KV"
    )
    with _demo_store(args.url) as location, VUA(cfg, location) as vua:
        print(f"store: {vua.store.url}\n")
        written, t_put = _timed(lambda: vua.put(tokens, kv))
        rewritten, t_reput = _timed(lambda: vua.put(tokens, kv))
        other = torch.cat([tokens[: n // 2], tokens[n // 2 :] + 1])
        probes = {
            "full prompt": tokens,
            "half shared": other,
            "unseen": tokens + 1,
        }
        lookups = {label: _timed(lambda t=t: vua.lookup(t)) for label, t in probes.items()}  # type: ignore[misc]
        result, t_get = _timed(lambda: vua.get_closest(tokens, device="cpu"))
        half, t_half = _timed(lambda: vua.get_closest(other, device="cpu"))
    exact = result is not None and all(
        torch.equal(got_k, k) and torch.equal(got_v, v) for (got_k, got_v), (k, v) in zip(result.data, kv, strict=True)
    )
    rows = [
        ("put (cold)", f"{written} objects", t_put, kv_bytes),
        ("put (already stored)", f"{rewritten} objects", t_reput, 0),
        ("get_closest (full)", f"{0 if result is None else result.tokens.numel()} tokens", t_get, kv_bytes),
        ("get_closest (half)", f"{0 if half is None else half.tokens.numel()} tokens", t_half, kv_bytes // 2),
    ]
    rows += [(f"lookup ({label})", f"{hit} tokens hit", t, 0) for label, (hit, t) in lookups.items()]
    print(f"{'operation':<24}{'result':>18}{'time':>11}{'throughput':>14}")
    for label, what, seconds, moved in rows:
        rate = f"{human_size(moved / seconds)}/s" if moved else "-"
        print(f"{label:<24}{what:>18}{seconds * 1000:>9.1f}ms{rate:>14}")
    print(f"\nround trip bit-exact: {'yes' if exact else 'NO'}")
    print(f"machine: {describe_machine()}")
    return (
        0 if exact and half is not None and half.tokens.numel() == n // 2 // cfg.split_factor * cfg.split_factor else 1
    )
