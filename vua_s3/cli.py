"""The ``vua-s3`` command: a demo of the whole path, and views of what a store holds."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from .config import VUAConfig
from .errors import VUAError
from .shapes import PRESETS
from .store import Store, open_store
from .vua import VUA

_T = TypeVar("_T")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def describe_machine() -> str:
    """CPU model, core count and memory: what a reader needs to weigh the figures."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    memory = ""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        memory = f", {int(f.readline().split()[1]) / (1 << 20):.0f} GiB RAM"
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} cores{memory}, {system}"


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
    from .embedded import EmbeddedS3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with EmbeddedS3() as server:
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
        f"{_size(kv_bytes)} of KV"
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
        rate = f"{_size(moved / seconds)}/s" if moved else "-"
        print(f"{label:<24}{what:>18}{seconds * 1000:>9.1f}ms{rate:>14}")
    print(f"\nround trip bit-exact: {'yes' if exact else 'NO'}")
    print(f"machine: {describe_machine()}")
    return (
        0 if exact and half is not None and half.tokens.numel() == n // 2 // cfg.split_factor * cfg.split_factor else 1
    )


@dataclass
class _Usage:
    objects: int = 0
    bytes: int = 0
    times: list[float] = field(default_factory=list)


async def _usage(location: str) -> dict[str, _Usage]:
    store = open_store(location)
    try:
        usage: dict[str, _Usage] = {}
        async for info in store.list():
            entry = usage.setdefault(info.key.split("/", 1)[0], _Usage())
            entry.objects += 1
            entry.bytes += info.size
            entry.times.append(info.last_modified)
        return usage
    finally:
        await store.close()


def stats(args: argparse.Namespace) -> int:
    """Objects and bytes per namespace."""
    usage = asyncio.run(_usage(args.url))
    if not usage:
        print(f"{args.url}: empty")
        return 0
    print(f"{'namespace':<40}{'objects':>10}{'bytes':>14}{'oldest':>22}{'newest':>22}")
    for name, entry in sorted(usage.items()):
        oldest, newest = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) for t in (min(entry.times), max(entry.times))
        )
        print(f"{name:<40}{entry.objects:>10}{_size(entry.bytes):>14}{oldest:>22}{newest:>22}")
    total_objects = sum(e.objects for e in usage.values())
    total_bytes = sum(e.bytes for e in usage.values())
    print(f"{'total':<40}{total_objects:>10}{_size(total_bytes):>14}")
    return 0


def ls(args: argparse.Namespace) -> int:
    """Namespaces in a store, or the fragments of one namespace."""
    if not args.namespace:
        for name, entry in sorted(asyncio.run(_usage(args.url)).items()):
            print(f"{name}/\t{entry.objects} objects\t{_size(entry.bytes)}")
        return 0

    async def listing() -> None:
        store = open_store(args.url)
        try:
            async for info in store.list(args.namespace.rstrip("/") + "/"):
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.last_modified))
                print(f"{stamp}  {info.size:>12}  {info.key}")
        finally:
            await store.close()

    asyncio.run(listing())
    return 0


def doctor(args: argparse.Namespace) -> int:
    """Check that a store can hold a cache; prints a table and how to fix each failure."""
    from .ops import FAIL, doctor, format_checks

    checks = doctor(args.url)
    print(format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def gc(args: argparse.Namespace) -> int:
    """Delete fragments older than --older-than; a progress bar on a terminal, then a summary."""
    from . import ops

    def progress(done: int, total: int) -> None:
        filled = 30 * done // total
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)

    report = asyncio.run(
        ops.gc(
            args.url,
            args.older_than,
            namespace=args.namespace,
            dry_run=args.dry_run,
            progress=progress if sys.stderr.isatty() else None,
        )
    )
    if sys.stderr.isatty() and report.expired:
        print(file=sys.stderr)
    verb = "would delete" if report.dry_run else "deleted"
    print(
        f"{verb} {report.deleted} of {report.scanned} objects ({_size(report.bytes_freed)}), "
        f"{report.expired - report.deleted} rewritten meanwhile and kept, "
        f"{report.skipped_foreign} non-fragment objects left alone; "
        f"{'would abort' if report.dry_run else 'aborted'} {report.uploads_aborted} stale multipart uploads"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vua-s3", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log vua_s3's debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="store, probe, fetch and verify a synthetic KV cache")
    p.add_argument("--url", help="store location (default: an embedded S3 server on 127.0.0.1)")
    p.add_argument("--model", choices=sorted(PRESETS), default="llama3-8b", help="KV shape preset")
    p.add_argument("--tokens", type=_positive_int, default=2048, help="prompt length (trimmed to the split factor)")
    p.add_argument("--split-factor", type=_positive_int, default=256, help="tokens per stored group")
    p.set_defaults(func=demo)

    from .bench import add_arguments, bench

    p = sub.add_parser("bench", help="vua_s3 beside the raw S3 transfer floor, measured in one run")
    add_arguments(p)
    p.set_defaults(func=bench)

    p = sub.add_parser("ls", help="list namespaces, or the fragments of one namespace")
    p.add_argument("url", help="store location: s3://bucket/prefix?..., file:///path or a path")
    p.add_argument("namespace", nargs="?", help="list this namespace's fragments")
    p.set_defaults(func=ls)

    p = sub.add_parser("stats", help="objects and bytes per namespace")
    p.add_argument("url", help="store location: s3://bucket/prefix?..., file:///path or a path")
    p.set_defaults(func=stats)

    p = sub.add_parser("doctor", help="check that an endpoint and bucket can hold a cache, with fixes")
    p.add_argument("url", help="store location: s3://bucket/prefix?..., file:///path or a path")
    p.set_defaults(func=doctor)

    p = sub.add_parser("gc", help="delete fragments older than an age (S3 LastModified, POSIX mtime)")
    p.add_argument("url", help="store location: s3://bucket/prefix?..., file:///path or a path")
    p.add_argument("--older-than", type=_age, required=True, help="age such as 7d, 12h, 30m (units s m h d w)")
    p.add_argument("--namespace", type=_namespace, help="only this namespace")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    p.set_defaults(func=gc)
    return parser


def _namespace(text: str) -> str:
    try:
        return VUAConfig(namespace=text).namespace
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _age(text: str) -> float:
    from .ops import parse_age

    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # vua_s3's own messages only: botocore's debug output shows request signatures
        logging.getLogger("vua_s3").setLevel(logging.DEBUG)
    try:
        return int(args.func(args))
    except VUAError as exc:
        print(f"vua-s3: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
