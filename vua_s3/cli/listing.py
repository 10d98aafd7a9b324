"""``vua-s3 ls`` and ``vua-s3 stats``: what a store holds, per namespace."""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..storage import open_store
from .args import LOCATION_HELP, human_size


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("ls", help="list namespaces, or the fragments of one namespace")
    p.add_argument("url", help=LOCATION_HELP)
    p.add_argument("namespace", nargs="?", help="list this namespace's fragments")
    p.set_defaults(func=ls)

    p = sub.add_parser("stats", help="objects and bytes per namespace")
    p.add_argument("url", help=LOCATION_HELP)
    p.set_defaults(func=stats)


@dataclass
class _Usage:
    objects: int = 0
    bytes: int = 0
    times: list[float] = field(default_factory=list)


async def _usage(location: str) -> dict[str, _Usage]:
    store = open_store(location)
    try:
        usage: dict[str, _Usage] = {}
        async for info in store.list():
            entry = usage.setdefault(info.key.split("/", 1)[0], _Usage())
            entry.objects += 1
            entry.bytes += info.size
            entry.times.append(info.last_modified)
        return usage
    finally:
        await store.close()


def stats(args: argparse.Namespace) -> int:
    """Objects and bytes per namespace."""
    usage = asyncio.run(_usage(args.url))
    if not usage:
        print(f"{args.url}: empty")
        return 0
    print(f"{'namespace':<40}{'objects':>10}{'bytes':>14}{'oldest':>22}{'newest':>22}")
    for name, entry in sorted(usage.items()):
        oldest, newest = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) for t in (min(entry.times), max(entry.times))
        )
        print(f"{name:<40}{entry.objects:>10}{human_size(entry.bytes):>14}{oldest:>22}{newest:>22}")
    total_objects = sum(e.objects for e in usage.values())
    total_bytes = sum(e.bytes for e in usage.values())
    print(f"{'total':<40}{total_objects:>10}{human_size(total_bytes):>14}")
    return 0


def ls(args: argparse.Namespace) -> int:
    """Namespaces in a store, or the fragments of one namespace."""
    if not args.namespace:
        for name, entry in sorted(asyncio.run(_usage(args.url)).items()):
            print(f"{name}/\t{entry.objects} objects\t{human_size(entry.bytes)}")
        return 0

    async def listing() -> None:
        store = open_store(args.url)
        try:
            async for info in store.list(args.namespace.rstrip("/") + "/"):
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.last_modified))
                print(f"{stamp}  {info.size:>12}  {info.key}")
        finally:
            await store.close()

    asyncio.run(listing())
    return 0
