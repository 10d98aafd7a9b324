"""``vua-s3 bench-gpu``: get_closest onto a GPU and put from one, beside the copy floors of the same run."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..bench.gpu import GpuBenchOptions, checks_pass, run_gpu_bench
from ..shapes import PRESETS, ModelShape
from .args import positive_int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench-gpu", help="get_closest onto a GPU and put from one, beside pinned-copy floors")
    p.add_argument("--model", choices=sorted(PRESETS), default="llama3-8b", help="KV shape preset")
    p.add_argument("--layers", type=positive_int, help="override the preset's layer count")
    p.add_argument("--tokens", type=positive_int, default=8192, help="prompt length of the POSIX rows")
    p.add_argument("--s3-tokens", type=positive_int, default=2048, help="prompt length of the S3 rows")
    p.add_argument("--split-factor", type=positive_int, default=256)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=8, help="threads of the file floors")
    p.add_argument("--posix-dir", help="where the POSIX rows run (default /dev/shm, else the temp dir)")
    p.add_argument("--url", help="s3://bucket/prefix?... to measure (default: moto in its own process, 127.0.0.1)")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 rows")
    p.add_argument("--json", action="store_true", help="print the report as JSON, nothing else")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.set_defaults(func=bench_gpu)


def bench_gpu(args: argparse.Namespace) -> int:
    """The ``bench-gpu`` subcommand."""
    preset = PRESETS[args.model]
    shape = preset if args.layers is None else ModelShape("custom", args.layers, preset.kv_heads, preset.head_dim)
    options = GpuBenchOptions(
        shape=shape,
        tokens=args.tokens,
        s3_tokens=args.s3_tokens,
        split_factor=args.split_factor,
        repeats=args.repeats,
        posix_dir=args.posix_dir,
        s3=not args.no_s3,
        url=args.url,
        threads=args.threads,
    )
    report = run_gpu_bench(options)
    if report["note"]:
        print(f"vua-s3 bench-gpu: {report['note']}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2) if args.json else format_gpu_report(report))
    if not checks_pass(report):
        print("vua-s3 bench-gpu: a get was not bit-exact or a put did not write every group", file=sys.stderr)
        return 1
    return 0


def format_gpu_report(report: dict[str, Any]) -> str:
    """The human-readable table: each vua_s3 figure beside its floors, with the ratio."""
    shape = report["shape"]
    lines = [
        f"vua-s3 bench-gpu, {report['when']}: {report['device']} "
        f"(torch {report['torch']}, CUDA {report['cuda_runtime']})",
        f"machine: {report['machine']}; load average {_loads(report['load_average'])} at start, "
        f"{_loads(report['load_average_end'])} at end",
        f"shape: {shape['name']} ({shape['layers']} layers, {shape['kv_heads']} KV heads, "
        f"head_dim {shape['head_dim']}, {shape['dtype']}), split factor {report['split_factor']}; "
        f"median of {report['repeats']} [min-max]",
    ]
    if report["note"]:
        lines.append(f"NOTE: {report['note']}")
    for section in ("posix", "s3"):
        data = report.get(section)
        if not data:
            continue
        lines += [
            "",
            f"{section} ({data.get('dir') or data.get('server')}): {data['tokens']} tokens, {data['objects']} "
            f"objects, {data['bytes_moved'] / 2**30:.3f} GiB; bit-exact: {data['bit_exact']}",
            f"{'':<22}{'GiB/s':>28}{'CPU s/GiB':>12}{'vua_s3 / it':>14}",
        ]
        rows = [(f"vua_s3 {verb}", data["vua"][verb], None) for verb in ("get", "put")]
        for name, figure in data["floor"].items():
            ratio = next((r for v in ("get", "put") if (r := report["ratios"].get(f"{section}_{v}_vs_{name}"))), None)
            rows.append((f"floor {name}", figure, ratio))
        for label, figure, ratio in rows:
            s = figure["gib_per_s"]
            rate = f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"
            versus = "" if ratio is None else f"{ratio:.2f}x"
            lines.append(f"{label:<22}{rate:>28}{figure['cpu_s_per_gib']['median']:>12.2f}{versus:>14}")
    return "\n".join(lines)


def _loads(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)
