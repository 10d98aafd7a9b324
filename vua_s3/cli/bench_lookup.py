"""``vua-s3 bench-lookup``: HEADs, round trips and latency of a lookup for each probe budget."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..bench.lookup import LookupBenchOptions, format_lookup_report, run_lookup_bench
from .args import positive_int, positive_ints


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench-lookup", help="HEADs, round trips and latency of lookup and put per probe_waves")
    p.add_argument("--url", help="s3://bucket/prefix?... to measure (default: a local SeaweedFS, else moto)")
    p.add_argument(
        "--groups", type=positive_ints, default=(8, 32, 128, 512), help="prompt lengths in groups, e.g. 8,32"
    )
    p.add_argument("--waves", type=positive_ints, default=(1, 2, 3, 4), help="probe_waves budgets to compare, e.g. 1,4")
    p.add_argument("--split-factor", type=positive_int, default=16, help="tokens per group")
    p.add_argument("--repeats", type=positive_int, default=7, help="repeats per case")
    p.add_argument("--json", action="store_true", help="print the figures as JSON, nothing else")
    p.set_defaults(func=bench_lookup)


def bench_lookup(args: argparse.Namespace) -> int:
    """The ``bench-lookup`` subcommand."""
    options = LookupBenchOptions(
        groups=args.groups,
        waves=args.waves,
        split_factor=args.split_factor,
        repeats=args.repeats,
        url=args.url,
    )
    result = run_lookup_bench(options)
    print(json.dumps(result, indent=2) if args.json else format_lookup_report(result))
    return 0
