"""``vua-s3 doctor`` and ``vua-s3 gc``: the operations on a store, from the command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from typing import Any

from ..ops.doctor import FAIL, format_checks
from ..ops.doctor import doctor as run_doctor
from ..ops.gc import gc as run_gc
from ..ops.soak import soak as run_soak
from .args import LOCATION_HELP, age, human_size, minutes, namespace, size


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check that an endpoint and bucket can hold a cache, with fixes")
    p.add_argument("url", help=LOCATION_HELP)
    p.set_defaults(func=doctor)

    p = sub.add_parser("gc", help="delete fragments older than an age, or the least recently written beyond a byte cap")
    p.add_argument("url", help=LOCATION_HELP)
    p.add_argument("--older-than", type=age, help="age such as 7d, 12h, 30m (units s m h d w)")
    p.add_argument(
        "--max-bytes",
        type=size,
        help="then delete the least recently modified (written, or read with refresh_after) until fragments fit, "
        "e.g. 500GiB",
    )
    p.add_argument("--per-namespace", action="store_true", help="--max-bytes applies to each namespace")
    p.add_argument(
        "--stale-after", type=age, help="remove incomplete writes older than this (default: --older-than, else 1h)"
    )
    p.add_argument("--namespace", type=namespace, help="only this namespace")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    p.set_defaults(func=gc, parser=p)

    p = sub.add_parser(
        "soak", help="run 4 clients, gc and injected faults against a local SeaweedFS, then check every result"
    )
    p.add_argument("--minutes", type=minutes, default=15.0, help="how long the clients run")
    p.add_argument("--json", help="also write the report to this file")
    p.set_defaults(func=soak)


def doctor(args: argparse.Namespace) -> int:
    """Check that a store can hold a cache; prints a table and how to fix each failure."""
    checks = run_doctor(args.url)
    print(format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def gc(args: argparse.Namespace) -> int:
    """Delete fragments older than --older-than and/or beyond --max-bytes; a progress bar on a
    terminal, then a summary."""
    if args.older_than is None and args.max_bytes is None:
        args.parser.error("give --older-than, --max-bytes or both")
    if args.per_namespace and args.max_bytes is None:
        args.parser.error("--per-namespace needs --max-bytes")

    def progress(done: int, total: int) -> None:
        filled = 30 * done // total
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)

    report = asyncio.run(
        run_gc(
            args.url,
            args.older_than,
            max_bytes=args.max_bytes,
            per_namespace=args.per_namespace,
            stale_after=args.stale_after,
            namespace=args.namespace,
            dry_run=args.dry_run,
            progress=progress if sys.stderr.isatty() else None,
        )
    )
    if sys.stderr.isatty() and report.expired + report.over_cap:
        print(file=sys.stderr)
    verb = "would delete" if report.dry_run else "deleted"
    cap = f", {report.over_cap} of them over the byte cap" if args.max_bytes is not None else ""
    print(
        f"{verb} {report.deleted} of {report.scanned} objects ({human_size(report.bytes_freed)}{cap}), "
        f"{report.expired + report.over_cap - report.deleted} rewritten meanwhile and kept, "
        f"{human_size(report.bytes_kept)} of fragments left, "
        f"{report.skipped_foreign} non-fragment objects left alone; "
        f"{'would remove' if report.dry_run else 'removed'} {report.uploads_aborted} stale incomplete writes"
    )
    return 0


def soak(args: argparse.Namespace) -> int:
    """The soak run; its summary, and 1 if any check failed."""
    report = run_soak(args.minutes * 60)
    print(report.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=1)
    return 1 if report.problems else 0
