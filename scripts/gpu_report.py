"""The GPU check's report (scripts/gpu_check.sh): OUTDIR/report.json from the phases, the test
results (tests.xml), the bench (bench.json) and the machine; a summary on stdout. Exits 0 only
when every phase ended in time with status 0, no test failed, and the bench was bit-exact. The
standard library only: it runs even when the install failed."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def phases(out: Path) -> dict[str, dict[str, Any]]:
    found = {}
    path = out / "phases.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds, budget = line.split()[:4]
        if rc == "skipped":
            found[name] = {"skipped": True}
            continue
        status = int(rc)
        found[name] = {"rc": status, "seconds": int(seconds), "budget": int(budget), "killed": status in (124, 137)}
    return found


def tests(out: Path) -> dict[str, Any]:
    path = out / "tests.xml"
    if not path.exists():
        return {"ran": False}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips, cuda_passed = [], {}, 0
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            counts["failed"] += 1
            failures.append(
                {"test": name, "message": (problem.get("message") or "")[:500], "text": (problem.text or "")[-3000:]}
            )
        elif skipped is not None:
            counts["skipped"] += 1
            reason = skipped.get("message") or ""
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
            cuda_passed += "cuda" in name
    return {"ran": True, **counts, "cuda_passed": cuda_passed, "failures": failures, "skip_reasons": skips}


def bench(out: Path) -> dict[str, Any] | None:
    path = out / "bench.json"
    return json.loads(path.read_text()) if path.exists() else None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "cores": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    return info


def source() -> dict[str, Any]:
    """What was tested: a digest of vua_s3/ and tests/gpu/, the commit where git is there, the wheels' SOURCE."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("vua_s3/**/*.py"), *ROOT.glob("tests/gpu/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    found: dict[str, Any] = {"sha256_vua_s3_and_tests_gpu": digest.hexdigest()}
    if (ROOT / ".git").exists() and shutil.which("git"):
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        )
        found["commit"] = done.stdout.strip()
    wheels = ROOT / ".whl" / "SOURCE"
    if wheels.exists():
        found["wheels"] = wheels.read_text().strip()
    return found


def main() -> int:
    out = Path(sys.argv[1])
    report: dict[str, Any] = {
        "phases": phases(out),
        "tests": tests(out),
        "machine": machine(),
        "source": source(),
        "posix_dir": (out / "posix_dir.txt").read_text().strip() if (out / "posix_dir.txt").exists() else None,
    }
    measured = bench(out)
    report["bench"] = measured
    cuda = bool(measured and measured.get("cuda"))
    problems = [f"phase {n} ended with {p['rc']}" for n, p in report["phases"].items() if p.get("rc")]
    problems += [f"phase {n} did not run" for n in ("install", "tests", "bench") if n not in report["phases"]]
    results = report["tests"]
    if not results["ran"]:
        problems.append("no test results (tests.xml)")
    elif results["failed"]:
        problems.append(f"{results['failed']} tests failed")
    if measured is None:
        problems.append("no bench report (bench.json)")
    elif not all(measured[s]["bit_exact"] for s in ("posix", "s3") if measured.get(s)):
        problems.append("the bench's gets were not all bit-exact")
    report["cuda"] = cuda
    report["ok"] = not problems
    report["problems"] = problems
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(summary(report))
    return 0 if report["ok"] else 1


def summary(report: dict[str, Any]) -> str:
    lines = ["", "=== GPU check: " + ("PASSED" if report["ok"] else "FAILED: " + "; ".join(report["problems"]))]
    lines.append(
        "cuda: " + (str(report["bench"]["device"]) if report["cuda"] else "no (a CPU run: the cuda cases skipped)")
    )
    for name, phase in report["phases"].items():
        lines.append(
            f"  {name}: "
            + (
                "skipped"
                if phase.get("skipped")
                else f"exit {phase['rc']} in {phase['seconds']} s of {phase['budget']}"
            )
        )
    results = report["tests"]
    if results["ran"]:
        counts = f"{results['passed']} passed ({results['cuda_passed']} cuda), {results['failed']} failed"
        lines.append(f"tests: {counts}, {results['skipped']} skipped")
        lines += [f"  FAILED {f['test']}: {f['message'][:200]}" for f in results["failures"]]
    if report["bench"]:
        lines += [f"  {name}: {ratio:.2f}x" for name, ratio in report["bench"]["ratios"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
