"""``vua-s3 ls`` and ``vua-s3 stats``: what a store holds, per namespace.

Objects are counted as they are; groups are the distinct prefixes with at least one
format-2 object (one object per KV head); format-1 objects (one per group, never read
since format 2) are counted apart so they can be expired. A namespace's identity manifests
(:mod:`vua_s3.manifest`) are not counted: ``ls`` shows what they say, which deployment wrote it."""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..keys import parse_key
from ..manifest import Manifest, is_manifest_key, read_manifest
from ..storage import Store, open_store
from .args import LOCATION_HELP, human_size


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("ls", help="list namespaces, or the fragments of one namespace")
    p.add_argument("url", help=LOCATION_HELP)
    p.add_argument("namespace", nargs="?", help="list this namespace's fragments")
    p.set_defaults(func=ls)

    p = sub.add_parser("stats", help="objects, groups and bytes per namespace")
    p.add_argument("url", help=LOCATION_HELP)
    p.set_defaults(func=stats)


@dataclass
class _Usage:
    objects: int = 0
    bytes: int = 0
    groups: set[str] = field(default_factory=set)
    v1: int = 0
    times: list[float] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)


async def _usage(location: str) -> dict[str, _Usage]:
    store = open_store(location)
    try:
        usage: dict[str, _Usage] = {}
        async for info in store.list():
            entry = usage.setdefault(info.key.split("/", 1)[0], _Usage())
            if is_manifest_key(info.key):
                entry.manifests.append(info.key)
                continue
            entry.objects += 1
            entry.bytes += info.size
            entry.times.append(info.last_modified)
            key = parse_key(info.key)
            if key is not None and key.version == 1:
                entry.v1 += 1
            elif key is not None:
                entry.groups.add(key.digest)
        return usage
    finally:
        await store.close()


def stats(args: argparse.Namespace) -> int:
    """Objects, groups, format-1 objects and bytes per namespace."""
    usage = asyncio.run(_usage(args.url))
    if not usage:
        print(f"{args.url}: empty")
        return 0
    print(f"{'namespace':<40}{'objects':>10}{'groups':>10}{'v1':>8}{'bytes':>14}{'oldest':>22}{'newest':>22}")
    for name, entry in sorted(usage.items()):
        if not entry.times:  # a manifest only
            continue
        oldest, newest = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) for t in (min(entry.times), max(entry.times))
        )
        row = f"{name:<40}{entry.objects:>10}{len(entry.groups):>10}{entry.v1:>8}{human_size(entry.bytes):>14}"
        print(f"{row}{oldest:>22}{newest:>22}")
    objects, groups, v1, size = (sum(column) for column in zip(*(_row(e) for e in usage.values()), strict=True))
    print(f"{'total':<40}{objects:>10}{groups:>10}{v1:>8}{human_size(size):>14}")
    if v1:
        print(f"{v1} objects of format 1 are never read; gc expires them by age")
    return 0


def _row(entry: _Usage) -> tuple[int, int, int, int]:
    return entry.objects, len(entry.groups), entry.v1, entry.bytes


def ls(args: argparse.Namespace) -> int:
    """Namespaces in a store and the identities that wrote them, or the objects of one namespace."""
    if not args.namespace:
        usage = asyncio.run(_usage(args.url))
        manifests = asyncio.run(_manifests(args.url, [k for e in usage.values() for k in e.manifests]))
        for name, entry in sorted(usage.items()):
            old = f"\t{entry.v1} of format 1 (never read)" if entry.v1 else ""
            print(f"{name}/\t{entry.objects} objects\t{len(entry.groups)} groups\t{human_size(entry.bytes)}{old}")
            for key in entry.manifests:
                print(f"  {describe(manifests.get(key))}")
        return 0

    async def listing() -> None:
        store = open_store(args.url)
        try:
            found = []
            async for info in store.list(args.namespace.rstrip("/") + "/"):
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.last_modified))
                kind = _kind(info.key)
                print(f"{stamp}  {info.size:>12}  {kind:<5}  {info.key}")
                if kind == "ident":
                    found.append(await read_manifest(store, info.key))
            for manifest in found:
                print(describe(manifest))
        finally:
            await store.close()

    asyncio.run(listing())
    return 0


def _kind(key: str) -> str:
    if is_manifest_key(key):
        return "ident"
    parsed = parse_key(key)
    return "other" if parsed is None else "v1" if parsed.head is None else f"h{parsed.head}"


def describe(manifest: Manifest | None) -> str:
    """One line: the identity and the readable inputs it covers."""
    if manifest is None:
        return "identity: unreadable manifest"
    parts = " ".join(f"{name}={value}" for name, value in _flat(manifest.inputs))
    return f"identity {manifest.identity}: {parts}"


def _flat(inputs: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for name, value in inputs.items():
        if isinstance(value, dict):
            items.extend(_flat(value, f"{prefix}{name}."))
        else:
            items.append((prefix + name, value))
    return items


async def _manifests(location: str, keys: list[str]) -> dict[str, Manifest | None]:
    if not keys:
        return {}
    store: Store = open_store(location)
    try:
        return {key: await read_manifest(store, key) for key in keys}
    finally:
        await store.close()
