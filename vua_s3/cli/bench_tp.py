"""``vua-s3 bench-tp``: requests and bytes per loaded group by writer and reader TP size."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..bench.tp import TpBenchOptions, format_tp_report, run_tp_bench
from ..config import DEFAULT_SPLIT_FACTOR
from ..shapes import PRESETS
from .args import LOCATION_HELP, positive_int, positive_ints


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench-tp", help="PUTs, lookup requests and waves, GETs and MiB per group by TP size")
    p.add_argument("--url", help=f"{LOCATION_HELP} (default: a temporary directory)")
    p.add_argument(
        "--models", type=_models, default=("llama3-8b", "tiny"), help=f"model shapes: {', '.join(sorted(PRESETS))}"
    )
    p.add_argument("--writers", type=positive_ints, default=(1, 2, 4, 8), help="writer TP sizes, e.g. 1,2,8")
    p.add_argument("--readers", type=positive_ints, default=(1, 2, 4, 8), help="reader TP sizes, e.g. 1,2")
    p.add_argument("--split-factor", type=positive_int, default=DEFAULT_SPLIT_FACTOR, help="tokens per group")
    p.add_argument("--groups", type=positive_int, default=2, help="groups per prompt")
    p.add_argument("--json", action="store_true", help="print the figures as JSON, nothing else")
    p.set_defaults(func=bench_tp)


def bench_tp(args: argparse.Namespace) -> int:
    """The ``bench-tp`` subcommand."""
    options = TpBenchOptions(
        models=args.models,
        writers=args.writers,
        readers=args.readers,
        split_factor=args.split_factor,
        groups=args.groups,
        url=args.url,
    )
    result = run_tp_bench(options)
    print(json.dumps(result, indent=2) if args.json else format_tp_report(result))
    return 0


def _models(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model {unknown[0]!r}: choose from {', '.join(sorted(PRESETS))}")
    return names
