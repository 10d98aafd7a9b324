"""``vua-s3 bench-vllm``: ``vllm serve`` without the connector, on an empty store, on a warm one,
on a slow one, with many clients on one new prefix and behind a hot system prompt."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..bench.serving import DEFAULT_VLLM_VENV
from ..bench.serving_bench import SCENARIOS, ServeBenchOptions, run_serve_bench
from ..bench.serving_report import format_serve_report
from ..config import DEFAULT_SPLIT_FACTOR
from .args import non_negative_int, positive_int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench-vllm", help="vllm serve with and without the connector, over HTTP")
    p.add_argument(
        "--workload",
        choices=["documents", "chat"],
        default="documents",
        help="documents: shared documents, distinct questions; chat: conversations of several rounds",
    )
    p.add_argument("--docs", type=positive_int, default=4, help="documents (conversations)")
    p.add_argument("--doc-tokens", type=positive_int, default=1024, help="tokens per document")
    p.add_argument("--questions", type=positive_int, default=4, help="questions per document (chat: rounds)")
    p.add_argument("--question-tokens", type=positive_int, default=32, help="tokens per question (chat: turn)")
    p.add_argument("--max-tokens", type=positive_int, default=16, help="output tokens per request")
    p.add_argument("--concurrency", type=positive_int, default=4, help="clients at once")
    p.add_argument("--layers", type=positive_int, default=4, help="layers of the random Llama")
    p.add_argument("--hidden", type=positive_int, default=512, help="hidden size of the random Llama (64 per head)")
    p.add_argument("--split-factor", type=positive_int, default=DEFAULT_SPLIT_FACTOR, help="tokens per stored group")
    p.add_argument("--latency-ms", type=float, default=20.0, help="added to every store request in the slow scenario")
    p.add_argument("--repeats", type=positive_int, default=3, help="runs per scenario, each on new prompts")
    p.add_argument(
        "--scenarios",
        type=_scenarios,
        default=SCENARIOS,
        help=f"comma-separated, run in the bench's order (default all: {','.join(SCENARIOS)})",
    )
    p.add_argument("--cpu-hog", type=non_negative_int, default=0, help="busy-loop processes beside the bench")
    p.add_argument("--per-request", type=Path, help="write every request's TTFT (JSON) to this file")
    p.add_argument(
        "--store",
        choices=["auto", "seaweed", "moto", "posix"],
        default="auto",
        help="S3 server on 127.0.0.1: SeaweedFS if installed (auto), else moto; or posix: files in the work dir",
    )
    p.add_argument(
        "--vllm-venv",
        type=Path,
        default=DEFAULT_VLLM_VENV,
        help="vLLM's venv (scripts/vllm_venv.sh; default $VUA_VLLM_VENV or ~/.cache/vua_s3/vllm-venv)",
    )
    p.add_argument("--work-dir", type=Path, help="where the checkpoint and server logs go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (every figure), nothing else")
    p.set_defaults(func=bench_vllm)


def bench_vllm(args: argparse.Namespace) -> int:
    """The ``bench-vllm`` subcommand."""
    options = ServeBenchOptions(
        workload=args.workload,
        docs=args.docs,
        doc_tokens=args.doc_tokens,
        questions=args.questions,
        question_tokens=args.question_tokens,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        layers=args.layers,
        hidden=args.hidden,
        split_factor=args.split_factor,
        latency_ms=args.latency_ms,
        repeats=args.repeats,
        scenarios=args.scenarios,
        cpu_hog=args.cpu_hog,
        store=args.store,
        vllm_venv=args.vllm_venv,
        work_dir=args.work_dir,
    )
    report = run_serve_bench(options)
    if args.per_request is not None:
        keep = ("options", "store", "machine", "date", "load_average_start", "load_average", "per_request")
        args.per_request.write_text(json.dumps({k: report[k] for k in keep}, indent=1))
    print(json.dumps(report, indent=2) if args.json else format_serve_report(report))
    return 0


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenarios {unknown}: choose from {', '.join(SCENARIOS)}")
    return names
