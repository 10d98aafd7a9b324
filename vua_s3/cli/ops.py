"""``vua-s3 doctor`` and ``vua-s3 gc``: the operations on a store, from the command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from ..ops.doctor import FAIL, format_checks
from ..ops.doctor import doctor as run_doctor
from ..ops.gc import gc as run_gc
from .args import LOCATION_HELP, age, human_size, namespace


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check that an endpoint and bucket can hold a cache, with fixes")
    p.add_argument("url", help=LOCATION_HELP)
    p.set_defaults(func=doctor)

    p = sub.add_parser("gc", help="delete fragments older than an age (S3 LastModified, POSIX mtime)")
    p.add_argument("url", help=LOCATION_HELP)
    p.add_argument("--older-than", type=age, required=True, help="age such as 7d, 12h, 30m (units s m h d w)")
    p.add_argument("--namespace", type=namespace, help="only this namespace")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    p.set_defaults(func=gc)


def doctor(args: argparse.Namespace) -> int:
    """Check that a store can hold a cache; prints a table and how to fix each failure."""
    checks = run_doctor(args.url)
    print(format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def gc(args: argparse.Namespace) -> int:
    """Delete fragments older than --older-than; a progress bar on a terminal, then a summary."""

    def progress(done: int, total: int) -> None:
        filled = 30 * done // total
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)

    report = asyncio.run(
        run_gc(
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
        f"{verb} {report.deleted} of {report.scanned} objects ({human_size(report.bytes_freed)}), "
        f"{report.expired - report.deleted} rewritten meanwhile and kept, "
        f"{report.skipped_foreign} non-fragment objects left alone; "
        f"{'would abort' if report.dry_run else 'aborted'} {report.uploads_aborted} stale multipart uploads"
    )
    return 0
