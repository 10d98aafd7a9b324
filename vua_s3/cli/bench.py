"""``vua-s3 bench``: vua_s3's figures beside the raw transfer floors, measured in one run."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from ..bench.report import checks_pass, format_report
from ..bench.run import BenchOptions, run_bench
from ..config import DEFAULT_SPLIT_FACTOR
from ..shapes import PRESETS, ModelShape
from .args import positive_int

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="vua_s3 beside the raw S3 transfer floor, measured in one run")
    add_arguments(p)
    p.set_defaults(func=bench)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="s3://bucket/prefix?... to measure (default: a local server started here)")
    p.add_argument(
        "--server",
        choices=["auto", "seaweedfs", "moto"],
        default="auto",
        help="local server when no --url: SeaweedFS if installed (auto), else embedded moto",
    )
    p.add_argument("--model", choices=sorted(PRESETS), default="llama3-8b", help="KV shape preset")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--kv-heads", type=int, help="override the preset's KV heads")
    p.add_argument("--head-dim", type=int, help="override the preset's head_dim")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="override the preset's dtype")
    p.add_argument("--tokens", type=int, default=4096, help="prompt length (trimmed to the split factor)")
    p.add_argument("--split-factor", type=positive_int, default=DEFAULT_SPLIT_FACTOR, help="tokens per stored group")
    p.add_argument("--batch", type=int, default=1, help="sequences per put")
    p.add_argument("--concurrency", type=int, help="S3 requests in flight (the URL's concurrency setting)")
    p.add_argument("--part-size", help="S3 part and range size, e.g. 16MiB")
    p.add_argument("--multipart-threshold", help="objects above this go in parts, e.g. 64MiB")
    p.add_argument("--max-inflight", type=int, help="fragments encoded or decoded at once (AsyncVUA max_inflight)")
    p.add_argument("--transport", choices=["auto", "crt", "aiobotocore"], help="S3 data path (the URL's transport)")
    p.add_argument(
        "--payload-signing", choices=["auto", "on", "off"], help="S3 body signing (the URL's payload_signing)"
    )
    p.add_argument("--posix-dir", help="where the POSIX rows run (default /dev/shm, else the temp dir)")
    p.add_argument("--no-posix", action="store_true", help="skip the POSIX rows")
    p.add_argument("--no-cold", action="store_true", help="skip the new-process get_closest")
    p.add_argument(
        "--refresh", action="store_true", help="also a load with refreshes due (refresh_after) beside one without"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--long-tokens",
        type=positive_int,
        help="also measure one prompt this long (e.g. 32768: 4 GiB of KV for llama3-8b, about 10 GiB of memory)",
    )
    p.add_argument("--long-repeats", type=positive_int, default=2, help="repeats of the long prompt's rows")
    p.add_argument("--json", action="store_true", help="print the report as JSON, nothing else")


def bench(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand."""
    preset = PRESETS[args.model]
    shape = ModelShape(
        preset.name if not any((args.layers, args.kv_heads, args.head_dim, args.dtype)) else "custom",
        layers=args.layers or preset.layers,
        kv_heads=args.kv_heads or preset.kv_heads,
        head_dim=args.head_dim or preset.head_dim,
        dtype=_DTYPES[args.dtype] if args.dtype else preset.dtype,
    )
    s3_options = {
        name: str(value)
        for name, value in (
            ("concurrency", args.concurrency),
            ("part_size", args.part_size),
            ("multipart_threshold", args.multipart_threshold),
            ("transport", args.transport),
            ("payload_signing", args.payload_signing),
        )
        if value is not None
    }
    options = BenchOptions(
        shape=shape,
        tokens=args.tokens,
        split_factor=args.split_factor,
        batch=args.batch,
        repeats=args.repeats,
        max_inflight=args.max_inflight,
        url=args.url,
        server=args.server,
        s3_options=s3_options,
        progress=not args.json and sys.stderr.isatty(),
        posix_dir=args.posix_dir,
        posix=not args.no_posix,
        cold=not args.no_cold,
        refresh=args.refresh,
        long_tokens=args.long_tokens,
        long_repeats=args.long_repeats,
    )
    report = run_bench(options)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if checks_pass(report) else 1
