"""What the store was asked during a serving run, counted where the store sees it: the requests
a proxy in front of the S3 server passed on (:class:`vua_s3.testing.faultproxy.Request`).

A group is one object per KV head (``<digest>.h<head>.safetensors``), so "loads per group"
is GETs per fragment object fetched and "uploads per group" PUTs per fragment object written,
averaged over the groups touched: 1 when every group a run needed crossed the wire once.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from ..testing.faultproxy import Request

_FRAGMENT = re.compile(r"([0-9a-f]{64})\.h(\d+)\.safetensors$")
VERBS = ("GET", "PUT", "LIST", "HEAD")


def verb(request: Request) -> str:
    """GET, PUT, LIST (a GET of the bucket with ``list-type``), HEAD, or the method as sent."""
    if request.method == "GET" and "list-type=" in request.query:
        return "LIST"
    return request.method


def _per_group(keys: Counter[str]) -> dict[str, Any] | None:
    """Requests per object, averaged over each group's objects; mean and max over groups."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for key, count in keys.items():
        match = _FRAGMENT.search(key)
        if match:
            by_group[match.group(1)].append(count)
    if not by_group:
        return None
    per = [sum(counts) / len(counts) for counts in by_group.values()]
    return {"groups": len(per), "mean": statistics.fmean(per), "max": max(per)}


def traffic(requests: Sequence[Request], prompts: int) -> dict[str, Any]:
    """Requests by verb (and per prompt sent), fragment GETs and PUTs, loads and uploads per group."""
    verbs = Counter(verb(r) for r in requests)
    gets: Counter[str] = Counter()
    puts: Counter[str] = Counter()
    for r in requests:
        kind = verb(r)
        if kind == "GET":
            gets[r.path] += 1
        elif kind == "PUT":
            puts[r.path] += 1
    counts = {k: verbs.get(k, 0) for k in VERBS}
    return {
        "requests": counts | {"other": sum(v for k, v in verbs.items() if k not in VERBS)},
        "per_prompt": {k: v / prompts for k, v in counts.items()},
        "fragment_gets": sum(n for key, n in gets.items() if _FRAGMENT.search(key)),
        "fragment_puts": sum(n for key, n in puts.items() if _FRAGMENT.search(key)),
        "loads_per_group": _per_group(gets),
        "uploads_per_group": _per_group(puts),
        "errors": sum(1 for r in requests if r.status >= 500 or r.status == 0),  # 0: no answer came
    }
