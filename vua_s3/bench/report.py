"""The bench's figures: statistics over repeats, the machine they ran on, and the printed table."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = float(1 << 30)


@dataclass
class Stat:
    """Median, min and max of one figure over the repeats."""

    median: float
    min: float
    max: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))


@dataclass
class Sample:
    """One timed run: wall seconds, client CPU seconds (all threads), requests by operation."""

    seconds: float
    cpu: float
    requests: Counter[str]


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


def summarize(samples: list[Sample], moved: int) -> dict[str, Any]:
    figure: dict[str, Any] = {"seconds": asdict(Stat.of([s.seconds for s in samples]))}
    if moved:
        figure["gib_per_s"] = asdict(Stat.of([moved / GIB / s.seconds for s in samples]))
        figure["cpu_s_per_gib"] = asdict(Stat.of([s.cpu / (moved / GIB) for s in samples]))
    figure["requests"] = dict(samples[-1].requests)
    return figure


def _rate(figure: dict[str, Any]) -> str:
    s = {k: v * 1024 for k, v in figure["gib_per_s"].items() if k != "samples"}
    return f"{s['median']:.1f} MiB/s [{s['min']:.1f}-{s['max']:.1f}]"


def _latency(figure: dict[str, Any]) -> str:
    s = figure["seconds"]
    return f"{s['median'] * 1e3:.1f} ms [{s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f}]"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table: each vua_s3 figure beside its floor and their ratio."""
    shape = report["shape"]
    settings = report["settings"]
    lines = [
        f"vua-s3 bench, {report['date']}",
        f"machine: {report['machine']}",
        f"server: {report['server']}",
        f"shape: {shape['name']} ({shape['layers']} layers, {shape['kv_heads']} KV heads, head_dim "
        f"{shape['head_dim']}, {shape['dtype']}); {report['tokens']} tokens x batch {report['batch']}, split factor "
        f"{report['split_factor']}: {report['groups']} objects, {report['bytes_moved'] / GIB:.3f} GiB of KV",
        "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        f"median of {report['repeats']} repeats [min-max]; client CPU is this process, all threads",
        "",
        f"{'operation':<22}{'vua_s3':>34}{'floor (plain aioboto3)':>34}{'ratio':>8}{'CPU s/GiB vua/floor':>22}",
    ]
    vua_r, floor_r, ratios = report["vua"], report["floor"], report["ratios"]
    pairs = [("put (cold)", "put_cold", "put", "put_vs_floor")]
    pairs += [(f"get_closest -> {d}", f"get_{d}", f"get_{d}", f"get_{d}_vs_floor") for d in ("cpu", "cuda")]
    for label, mine, base, ratio in pairs:
        if mine not in vua_r:
            continue
        cpu = f"{vua_r[mine]['cpu_s_per_gib']['median']:.2f}/{floor_r[base]['cpu_s_per_gib']['median']:.2f}"
        lines.append(f"{label:<22}{_rate(vua_r[mine]):>34}{_rate(floor_r[base]):>34}{ratios[ratio]:>7.2f}x{cpu:>22}")
    head = _latency(floor_r["head"])
    for label, mine, ratio in [
        ("put (already stored)", "put_stored", "put_stored_vs_head"),
        ("lookup (full hit)", "lookup_full", "lookup_full_vs_head"),
        ("lookup (half hit)", "lookup_half", "lookup_half_vs_head"),
        ("lookup (miss)", "lookup_miss", "lookup_miss_vs_head"),
    ]:
        requests = ", ".join(f"{v} {k}" for k, v in sorted(vua_r[mine]["requests"].items())) or "no requests"
        floor_text = head + " (1 HEAD)"
        lines.append(f"{label:<22}{_latency(vua_r[mine]):>34}{floor_text:>34}{ratios[ratio]:>7.2f}x  {requests}")
    cached = vua_r["put_stored_cached"]
    requests = ", ".join(f"{v} {k}" for k, v in sorted(cached["requests"].items())) or "no requests"
    lines.append(f"{'put (stored, cached)':<22}{_latency(cached):>34}{'':>34}{'':>8}  {requests}")
    return "\n".join(lines)


def checks_pass(report: dict[str, Any]) -> bool:
    """The bench's own sanity: everything found, nothing rewritten."""
    checks = report["checks"]
    full = report["tokens"] * report["batch"]
    ok = checks["put_written"] == report["groups"] and checks["reput_written"] == 0
    ok &= all(checks[k] == full for k in checks if k.startswith("get_"))
    ok &= checks["lookup_full"] == report["tokens"] and checks["lookup_miss"] == 0
    split = report["split_factor"]
    ok &= checks["lookup_half"] == report["tokens"] // 2 // split * split
    if not ok:
        print(f"vua-s3 bench: sanity checks failed: {checks}", file=sys.stderr)
    return bool(ok)
