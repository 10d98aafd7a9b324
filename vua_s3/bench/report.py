"""The bench's figures: statistics over repeats, the machine they ran on, and the printed table."""

from __future__ import annotations

import contextlib
import datetime
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
    server_cpu: float | None = None
    """CPU seconds of the server process (a local server the bench started), else ``None``."""


def context(store: str) -> dict[str, Any]:
    """Where and when a bench ran: its store, the machine, the load average, the time."""
    return {
        "store": store,
        "machine": describe_machine(),
        "load_average": os.getloadavg(),
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


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
        server = [s.server_cpu for s in samples if s.server_cpu is not None]
        if len(server) == len(samples):
            figure["server_cpu_s_per_gib"] = asdict(Stat.of([cpu / (moved / GIB) for cpu in server]))
    figure["requests"] = dict(samples[-1].requests)
    return figure


def _rate(figure: dict[str, Any]) -> str:
    s = {k: v * 1024 for k, v in figure["gib_per_s"].items() if k != "samples"}
    return f"{s['median']:.1f} MiB/s [{s['min']:.1f}-{s['max']:.1f}]"


def _latency(figure: dict[str, Any]) -> str:
    s = figure["seconds"]
    return f"{s['median'] * 1e3:.1f} ms [{s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f}]"


def _cpu(figure: dict[str, Any]) -> str:
    return f"{figure['cpu_s_per_gib']['median']:.2f}"


def _server(figure: dict[str, Any]) -> str:
    server = figure.get("server_cpu_s_per_gib")
    return "-" if server is None else f"{server['median']:.2f}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable tables: each vua_s3 figure beside its floors and their ratios."""
    shape = report["shape"]
    settings = report["settings"]
    load = report.get("load_average", {})
    lines = [
        f"vua-s3 bench, {report['date']}",
        f"machine: {report['machine']}; load average {_loads(load.get('start'))} at start, "
        f"{_loads(load.get('end'))} at end",
        f"server: {report['server']}; vua_s3 transport: {report['transport']}",
        f"shape: {shape['name']} ({shape['layers']} layers, {shape['kv_heads']} KV heads, head_dim "
        f"{shape['head_dim']}, {shape['dtype']}); {report['tokens']} tokens x batch {report['batch']}, split factor "
        f"{report['split_factor']}: {report['groups']} objects, {report['bytes_moved'] / GIB:.3f} GiB of KV",
        "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        f"median of {report['repeats']} repeats [min-max]; client CPU is this process, all threads; "
        f"peak RSS {report['peak_rss_mib']:.0f} MiB",
        "",
        f"{'operation':<26}{'vua_s3':>32}{'floor (plain aioboto3)':>32}{'ratio':>8}{'CPU s/GiB vua/floor':>22}"
        f"{'server CPU':>12}",
    ]
    vua_r, floor_r, ratios = report["vua"], report["floor"], report["ratios"]
    pairs = [("put (cold)", "put_cold", "put", "put_vs_floor")]
    pairs += [(f"get_closest -> {d} (warm)", f"get_{d}", f"get_{d}", f"get_{d}_vs_floor") for d in ("cpu", "cuda")]
    for label, mine, base, ratio in pairs:
        if mine not in vua_r:
            continue
        cpu = f"{_cpu(vua_r[mine])}/{_cpu(floor_r[base])}"
        server = f"{_server(vua_r[mine])}/{_server(floor_r[base])}"
        lines.append(
            f"{label:<26}{_rate(vua_r[mine]):>32}{_rate(floor_r[base]):>32}{ratios[ratio]:>7.2f}x{cpu:>22}{server:>12}"
        )
    if "get_cold" in vua_r:
        cold = vua_r["get_cold"]
        lines.append(f"{'get_closest, new process':<26}{_rate(cold):>32}{'':>32}{'':>8}{_cpu(cold):>22}")
    head = _latency(floor_r["head"])
    for label, mine, ratio in [
        ("put (already stored)", "put_stored", "put_stored_vs_head"),
        ("lookup (full hit)", "lookup_full", "lookup_full_vs_head"),
        ("lookup (half hit)", "lookup_half", "lookup_half_vs_head"),
        ("lookup (miss)", "lookup_miss", "lookup_miss_vs_head"),
        ("lookup (3x groups, 1/3 hit)", "lookup_long", "lookup_long_vs_head"),
    ]:
        requests = ", ".join(f"{v} {k}" for k, v in sorted(vua_r[mine]["requests"].items())) or "no requests"
        floor_text = head + " (1 HEAD)"
        per_list = ratios.get(ratio.replace("_vs_head", "_vs_list"))
        against_list = "" if per_list is None else f" ({per_list:.2f}x 1 LIST)"
        lines.append(
            f"{label:<26}{_latency(vua_r[mine]):>32}{floor_text:>32}{ratios[ratio]:>7.2f}x  {requests}{against_list}"
        )
    if "list" in floor_r:
        lines.append(f"{'one LIST (a group):':<26}{'':>32}{_latency(floor_r['list']):>32}")
    cached = vua_r["put_stored_cached"]
    requests = ", ".join(f"{v} {k}" for k, v in sorted(cached["requests"].items())) or "no requests"
    lines.append(f"{'put (stored, cached)':<26}{_latency(cached):>32}{'':>32}{'':>8}  {requests}")
    if "refresh" in report:
        lines += _refresh_lines(report["refresh"], report["ratios"]["get_refresh_due_vs_off"])
    lines += _clients(report)
    if "vllm_load" in vua_r:
        lines += ["", f"{'vLLM-style load (paged cache)':<40}{'throughput':>32}{'CPU s/GiB':>12}{'server':>8}"]
        lines.append(_row("vua_s3 load_groups, pooled stages", vua_r["vllm_load"]))
        crt = report["clients"].get("awscrt", {})
        if "vllm_load" in crt:
            lines.append(_row("awscrt reused buffer + one copy", crt["vllm_load"], ratios.get("vllm_load_vs_awscrt")))
    lines.append(f"{'page faults of fresh memory, 4 KiB pages':<40}{'':>32}{_cpu(floor_r['page_faults']):>12}")
    if "page_faults_huge" in floor_r:
        lines.append(f"{'page faults of fresh memory, huge pages':<40}{'':>32}{_cpu(floor_r['page_faults_huge']):>12}")
    posix = report["posix"]
    if posix:
        lines += [
            "",
            f"{'POSIX (' + report.get('posix_dir', '') + ')':<26}{'vua_s3':>32}{'file floor':>32}"
            f"{'original VUA':>32}{'vs floor':>10}{'vs orig.':>10}{'CPU s/GiB vua/floor/orig.':>28}",
        ]
        for verb, label in (("put", "put"), ("get", "get_closest -> cpu")):
            mine, base, orig = posix["vua"][verb], posix["floor"][verb], posix["original"][verb]
            cpu = f"{_cpu(mine)}/{_cpu(base)}/{_cpu(orig)}"
            lines.append(
                f"{label:<26}{_rate(mine):>32}{_rate(base):>32}{_rate(orig):>32}"
                f"{ratios[f'posix_{verb}_vs_floor']:>9.2f}x{ratios[f'posix_{verb}_vs_original']:>9.2f}x{cpu:>28}"
            )
        if "get_cold" in posix["vua"]:
            cold = posix["vua"]["get_cold"]
            lines.append(f"{'get_closest, new process':<26}{_rate(cold):>32}{'':>32}{'':>32}{'':>20}{_cpu(cold):>28}")
    if "long" in report:
        lines += format_long(report["long"])
    return "\n".join(lines)


def _refresh_lines(refresh: dict[str, Any], ratio: float) -> list[str]:
    """A load with every object due for a refresh beside the same load with refreshes off."""
    cpu, copies = refresh["cpu_ms_per_group"], refresh["copies_per_group"]
    return [
        "",
        f"{'refresh_after=' + format(refresh['refresh_after'], 'g') + ' s':<26}{'refresh due':>32}"
        f"{'refresh off':>32}{'ratio':>8}",
        f"{'get_closest -> cpu':<26}{_latency(refresh['get_due']):>32}{_latency(refresh['get_off']):>32}{ratio:>7.2f}x",
        f"{'per hit group':<26}{max(copies):>21g} copies{cpu['median']:>19.2f} ms CPU "
        f"[{cpu['min']:.2f}-{cpu['max']:.2f}]; their wait after the load {_latency(refresh['background'])}",
    ]


def _row(label: str, figure: dict[str, Any], versus: float | None = None) -> str:
    text = "" if versus is None else f"{versus:.2f}x"
    return f"{label:<40}{_rate(figure):>32}{_cpu(figure):>12}{_server(figure):>8}{text:>14}"


def _clients(report: dict[str, Any]) -> list[str]:
    """The other clients on the same objects (and awscrt on 32 MiB objects: the layout's price)."""
    ratios = report["ratios"]
    lines = [
        "",
        f"{'same objects, other client':<40}{'throughput':>32}{'CPU s/GiB':>12}{'server':>8}{'vua_s3 / it':>14}",
    ]
    for client, figures in report["clients"].items():
        rows: list[tuple[str, str, float | None]] = [
            ("put", "put", ratios.get(f"put_vs_{client}")),
            ("get into a fresh tensor", "get", ratios.get(f"get_cpu_vs_{client}")),
            ("get into a reused buffer", "get_reused", None),
            ("put, 32 MiB objects", "put_32mib", ratios.get("awscrt_put_per_head_vs_32mib")),
            ("get, 32 MiB objects", "get_32mib", ratios.get("awscrt_get_per_head_vs_32mib")),
        ]
        lines += [_row(f"{client} {label}", figures[name], versus) for label, name, versus in rows if name in figures]
    if "put_32mib" in report["clients"].get("awscrt", {}):
        lines.append("  (32 MiB rows: per-head objects / 32 MiB objects, awscrt itself)")
    return lines


def format_long(long: dict[str, Any]) -> list[str]:
    """The long-prompt rows (``--long-tokens``)."""
    lines = [
        "",
        f"{'long prompt: ' + str(long['tokens']) + ' tokens':<40}{'throughput':>32}{'CPU s/GiB':>12}{'server':>8}",
    ]
    mine, crt, ratios = long["vua"], long["clients"].get("awscrt", {}), long.get("ratios", {})
    for label, name, ratio in (
        ("put", "put_cold", "put_vs_awscrt"),
        ("get_closest -> cpu", "get_cpu", "get_cpu_vs_awscrt"),
        ("vLLM-style load", "vllm_load", "vllm_load_vs_awscrt"),
    ):
        lines.append(_row(f"vua_s3 {label}", mine[name], ratios.get(ratio)))
    for label, name in (
        ("put", "put"),
        ("get into a fresh tensor", "get"),
        ("get into a reused ring", "get_reused"),
        ("reused ring + one copy", "vllm_load"),
    ):
        if name in crt:
            lines.append(_row(f"awscrt {label}", crt[name]))
    return lines


def _loads(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "?"


def checks_pass(report: dict[str, Any]) -> bool:
    """The bench's own sanity: everything found, nothing rewritten."""
    checks = report["checks"]
    full = report["tokens"] * report["batch"]
    ok = checks["put_written"] == report["groups"] and checks["reput_written"] == 0
    ok &= all(checks[k] == full for k in checks if k.endswith("get_tokens"))
    ok &= checks["lookup_full"] == report["tokens"] == checks["lookup_long"] and checks["lookup_miss"] == 0
    split = report["split_factor"]
    ok &= checks["lookup_half"] == report["tokens"] // 2 // split * split
    ok &= checks["vllm_load_groups"] == report["tokens"] // split
    long = report.get("long")
    if long is not None:
        want = long["tokens"] // split
        ok &= long["checks"]["put_written"] == long["checks"]["vllm_load_groups"] == want
        ok &= long["checks"]["get_cpu_tokens"] == long["tokens"]
    if not ok:
        print(f"vua-s3 bench: sanity checks failed: {checks} {long and long['checks']}", file=sys.stderr)
    return bool(ok)
