"""The ``vua-s3`` command: a demo of the whole path, views of what a store holds, its operations
and the bench. Each command group lives in its own module and registers its own arguments."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import VUAError
from . import bench, bench_gpu, bench_lookup, bench_tp, bench_vllm, demo, listing, ops

DESCRIPTION = (
    "vua-s3: a KV-cache store for LLM inference on S3-compatible object storage and POSIX. "
    "Try the whole path on a demo, see what a store holds, check a bucket, expire old entries "
    "and measure the data path. Run 'vua-s3 COMMAND --help' for a command's options."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vua-s3", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log vua_s3's debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    bench.add_parser(sub)
    bench_lookup.add_parser(sub)
    bench_tp.add_parser(sub)
    bench_gpu.add_parser(sub)
    bench_vllm.add_parser(sub)
    listing.add_parsers(sub)
    ops.add_parsers(sub)
    return parser


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
