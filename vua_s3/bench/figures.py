"""The bench's report sections: where each measurement goes, and the ratios between them."""

from __future__ import annotations

from typing import Any

from .report import Sample, summarize

_SECTIONS = (
    ("floor_", "floor"),
    ("s3transfer_", "clients/s3transfer"),
    ("awscrt_", "clients/awscrt"),
    ("posixvua_", "posix/vua"),
    ("posixfloor_", "posix/floor"),
    ("original_", "posix/original"),
    ("refresh_", "refresh"),
)


def section(name: str) -> tuple[str, str]:
    """Where a measurement goes in the report, and its label there."""
    for prefix, where in _SECTIONS:
        if name.startswith(prefix):
            return where, name.removeprefix(prefix)
    if name.startswith("page_faults"):
        return "floor", name
    return "vua", name


def moves_data(label: str) -> bool:
    return label in ("put_cold", "put", "put_32mib") or label.startswith(("get", "page_faults", "vllm_load"))


def sections(results: dict[str, list[Sample]], moved: int, moved_per_row: int) -> dict[str, Any]:
    """The report's ``vua``, ``floor``, ``clients`` and ``posix`` sections. The vLLM-style
    rows move one sequence's KV (``moved_per_row``), the others every row's (``moved``)."""
    report: dict[str, Any] = {"vua": {}, "floor": {}, "clients": {}, "posix": {}}
    if any(name.startswith("refresh_") for name in results):
        report["refresh"] = {}
    for name, samples in results.items():
        where, label = section(name)
        amount = moved_per_row if label.startswith("vllm_load") else moved
        figure = summarize(samples, amount if moves_data(label) else 0)
        if where not in ("vua", "refresh"):
            del figure["requests"]  # counted on vua_s3's store only
        target = report[where.split("/")[0]]
        if "/" in where:
            target = target.setdefault(where.split("/")[1], {})
        target[label] = figure
    return report


def rate(figure: dict[str, Any]) -> float:
    return float(figure["gib_per_s"]["median"])


def cpu(figure: dict[str, Any]) -> float:
    return float(figure["cpu_s_per_gib"]["median"])


def ratios(report: dict[str, Any], devices: list[str]) -> dict[str, float]:
    vua_r, floor_r, clients, posix = report["vua"], report["floor"], report["clients"], report["posix"]
    out = {"put_vs_floor": rate(vua_r["put_cold"]) / rate(floor_r["put"])}
    for device in devices:
        out[f"get_{device}_vs_floor"] = rate(vua_r[f"get_{device}"]) / rate(floor_r[f"get_{device}"])
    for client, figures in clients.items():
        out[f"put_vs_{client}"] = rate(vua_r["put_cold"]) / rate(figures["put"])
        out[f"get_cpu_vs_{client}"] = rate(vua_r["get_cpu"]) / rate(figures["get"])
    if "awscrt" in clients:
        crt = clients["awscrt"]
        out["put_cpu_vs_awscrt"] = cpu(vua_r["put_cold"]) / cpu(crt["put"])
        out["get_cpu_cpu_vs_awscrt"] = cpu(vua_r["get_cpu"]) / cpu(crt["get"])
        if "vllm_load" in vua_r and "vllm_load" in crt:
            out["vllm_load_vs_awscrt"] = rate(vua_r["vllm_load"]) / rate(crt["vllm_load"])
            out["vllm_load_cpu_vs_awscrt"] = cpu(vua_r["vllm_load"]) / cpu(crt["vllm_load"])
        if "put_32mib" in crt:  # the per-head layout's price, to the C client itself
            out["awscrt_put_per_head_vs_32mib"] = rate(crt["put"]) / rate(crt["put_32mib"])
            out["awscrt_get_per_head_vs_32mib"] = rate(crt["get"]) / rate(crt["get_32mib"])
    head = floor_r["head"]["seconds"]["median"]
    for kind in ("full", "half", "miss", "long"):
        out[f"lookup_{kind}_vs_head"] = vua_r[f"lookup_{kind}"]["seconds"]["median"] / head
    out["put_stored_vs_head"] = vua_r["put_stored"]["seconds"]["median"] / head
    if "list" in floor_r:  # probes of multi-head groups are LISTs
        listing = floor_r["list"]["seconds"]["median"]
        for kind in ("full", "half", "miss", "long"):
            out[f"lookup_{kind}_vs_list"] = vua_r[f"lookup_{kind}"]["seconds"]["median"] / listing
    if "refresh" in report:
        due, off = report["refresh"]["get_due"], report["refresh"]["get_off"]
        out["get_refresh_due_vs_off"] = due["seconds"]["median"] / off["seconds"]["median"]
    if posix:
        for verb in ("put", "get"):
            out[f"posix_{verb}_vs_floor"] = rate(posix["vua"][verb]) / rate(posix["floor"][verb])
            out[f"posix_{verb}_vs_original"] = rate(posix["vua"][verb]) / rate(posix["original"][verb])
    return out
