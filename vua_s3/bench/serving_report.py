"""The serving bench's figures over repeats (median, min, max) and its printed report: one table of
serving figures, one of store traffic, and the slowest requests, which explain an outlier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .report import Stat
from .serving import PROMPT_FIGURES, STORE_FIGURES

_RUN_FIGURES = ("ttft_p50", "ttft_p90", "ttft_max", "tok_s", "req_s", "server_cpu_s", "cpu_s_per_gib",
                "store_side_cpu_s")  # fmt: skip
_SLOWEST = 3
_SERVING_HEAD = ["TTFT p50 (s)", "TTFT p90 (s)", "output tok/s", "req/s", "server CPU s", "CPU s/GiB moved",
                 "store-side CPU s", "load avg (1 min)"]  # fmt: skip
_STORE_HEAD = ["prompt tokens computed / prefix-cache hit / loaded", "lookups", "hit tokens", "loaded MiB",
               "stored MiB", "LIST/prompt", "HEAD/prompt", "object GETs", "object PUTs", "loads/group",
               "uploads/group"]  # fmt: skip


def _traffic_figures(run: dict[str, Any]) -> dict[str, float | None]:
    """A run's store requests as flat figures: per prompt by verb, per group loads and uploads."""
    t = run.get("traffic")
    if t is None:
        return {}
    flat: dict[str, float | None] = {f"{v.lower()}_per_prompt": n for v, n in t["per_prompt"].items()}
    flat |= {"fragment_gets": t["fragment_gets"], "fragment_puts": t["fragment_puts"], "store_errors": t["errors"]}
    for kind in ("loads", "uploads"):
        group = t[f"{kind}_per_group"]
        flat[f"{kind}_per_group"] = None if group is None else group["mean"]
        flat[f"{kind}_per_group_max"] = None if group is None else group["max"]
    return flat


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max over the runs of every figure that every run has."""
    samples: dict[str, list[float | None]] = {}
    for run in runs:
        figures: dict[str, float | None] = {f: run[f] for f in _RUN_FIGURES}
        figures |= {f: run["store"][f] for f in STORE_FIGURES + PROMPT_FIGURES}
        figures |= _traffic_figures(run)
        for name, value in figures.items():
            samples.setdefault(name, []).append(value)
    return {
        name: asdict(Stat.of([v for v in values if v is not None]))
        for name, values in samples.items()
        if len(values) == len(runs) and all(v is not None for v in values)
    }


def _cell(summary: dict[str, Any], figure: str, fmt: str, scale: float = 1.0) -> str:
    if figure not in summary:
        return "-"
    s = summary[figure]
    low, high = s["min"] / scale, s["max"] / scale
    if low == high:
        return f"{low:{fmt}}"
    return f"{s['median'] / scale:{fmt}} ({low:{fmt}}-{high:{fmt}})"


def _loads(scenario: dict[str, Any]) -> str:
    loads = [r[k][0] for r in scenario["runs"] for k in ("load_average_before", "load_average")]
    return f"{min(loads):.1f}-{max(loads):.1f}"


def _table(report: dict[str, Any], head: list[str], row: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    lines = ["| scenario | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, scenario in report["scenarios"].items():
        lines.append(f"| {name} | " + " | ".join(row(scenario)) + " |")
    return lines


def slowest(per_request: list[list[dict[str, Any]]], count: int = _SLOWEST) -> list[dict[str, Any]]:
    """The ``count`` slowest requests to a first token over all runs, each with its run."""
    every = [r | {"run": i} for i, run in enumerate(per_request) for r in run]
    return sorted(every, key=lambda r: r["ttft_s"], reverse=True)[:count]


def _where(store: str) -> str:
    if store == "posix":
        return "posix (files in the work dir, no proxy: no store-side CPU, no request counts)"
    return f"{store} on 127.0.0.1 behind a counting proxy (store-side CPU: the server's and the proxy's)"


def format_serve_report(report: dict[str, Any]) -> str:
    """The report as Markdown: medians over the runs, min-max beside them where they differ."""
    o = report["options"]
    unit = "rounds" if o["workload"] == "chat" else "questions"
    loads = (
        " ".join(f"{v:.2f}" for v in report["load_average_start"]),
        " ".join(f"{v:.2f}" for v in report["load_average"]),
    )
    lines = [
        f"vllm serve, random Llama ({o['layers']} layers, hidden {o['hidden']}, float32, CPU); {o['workload']}: "
        f"{o['docs']} documents x {o['questions']} {unit}, {o['doc_tokens']}+{o['question_tokens']} prompt tokens, "
        f"{o['max_tokens']} output tokens, {o['concurrency']} concurrent clients; split_factor {o['split_factor']}; "
        f"store: {_where(report['store'])}; {o['cpu_hog']} CPU hog(s); "
        f"{o['repeats']} runs per scenario, median (min-max)",
        f"machine: {report['machine']}; {report['date']}; load average {loads[0]} at the start, {loads[1]} at the end",
        "",
    ]

    def serving(scenario: dict[str, Any]) -> list[str]:
        s = scenario["summary"]
        figures = (("ttft_p50", ".3f"), ("ttft_p90", ".3f"), ("tok_s", ".0f"), ("req_s", ".2f"),
                   ("server_cpu_s", ".1f"), ("cpu_s_per_gib", ".0f"), ("store_side_cpu_s", ".1f"))  # fmt: skip
        return [_cell(s, f, fmt) for f, fmt in figures] + [_loads(scenario)]

    def store(scenario: dict[str, Any]) -> list[str]:
        s = scenario["summary"]
        sources = " / ".join(_cell(s, f, ".0f") for f in PROMPT_FIGURES)
        counts = [_cell(s, f, ".0f") for f in ("lookups", "hit_tokens")]
        counts += [_cell(s, f, ".1f", 2**20) for f in ("load_bytes", "store_bytes")]
        counts += [_cell(s, f"{v}_per_prompt", ".2f") for v in ("list", "head")]
        counts += [_cell(s, f, ".0f") for f in ("fragment_gets", "fragment_puts")]
        for kind in ("loads", "uploads"):
            mean, most = _cell(s, f"{kind}_per_group", ".2f"), _cell(s, f"{kind}_per_group_max", ".0f")
            counts.append("-" if mean == "-" else f"{mean}, max {most}")
        return [sources, *counts]

    lines += _table(report, _SERVING_HEAD, serving)
    lines += [""]
    lines += _table(report, _STORE_HEAD, store)
    lines += ["", "slowest requests (TTFT s; run, wave/session/turn, opening, sent at s after the run's start):"]
    for name, per_request in report["per_request"].items():
        worst = ", ".join(
            f"{r['ttft_s']:.3f} (run {r['run']}, {r['wave']}/{r['session']}/{r['turn']}, opening {r['opening']}, "
            f"+{r['start_s']:.2f})"
            for r in slowest(per_request)
        )
        lines.append(f"- {name}: {worst}")
    return "\n".join(lines)
