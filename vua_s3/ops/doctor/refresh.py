"""The doctor's check of ``refresh_after``: can this store re-stamp an object it holds, keeping
its bytes (and what the backend's ``describe`` shows: encryption, checksum), and does it decline
a refresh of an object modified since? Only warnings: a cache works without it, its objects
then expire by their last write."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

from ...errors import AccessDeniedError, StoreError
from ...storage import ObjectInfo, Store
from .common import PASS, WARN, Check

FALLBACK = "leave refresh_after off: objects then expire by their last write (lifecycle rule, gc --older-than)"


async def refresh_check(
    store: Store,
    key: str,
    age: Callable[[ObjectInfo], Awaitable[None]],
    describe: Callable[[str], dict[str, Any]] | None = None,
    *,
    denied_fix: str,
) -> Check:
    """Write ``key``, make it older (``age``), refresh it, and compare: last-modified moved,
    bytes and ``describe(key)`` unchanged; then a refresh bounded before its new time must be
    declined. ``key`` is removed at the end."""
    payload = os.urandom(64 << 10)
    try:
        await store.put(key, payload)
        info = (await store.head_many([key]))[0]
        if info is None:
            return Check("refresh", WARN, "the object just written is missing", "fix the failures above first")
        await age(info)
        old = (await store.head_many([key]))[0]
        before = describe(key) if describe else {}
        if old is None or not await store.refresh(key, old.last_modified + 1):
            return Check("refresh", WARN, "a refresh of an old object was declined", FALLBACK)
        new = (await store.head_many([key]))[0]
        after = describe(key) if describe else {}
        if new is None or new.last_modified <= old.last_modified:
            return Check("refresh", WARN, "the copy onto itself did not move last-modified", FALLBACK)
        if await store.get(key) != payload or after != before:
            changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
            detail = f"the refresh changed the object ({', '.join(changed) or 'bytes'})"
            return Check("refresh", WARN, detail, "report this as a bug; " + FALLBACK)
        moved = f"last-modified +{new.last_modified - old.last_modified:.0f} s, bytes{', ' if before else ''}"
        kept = moved + ", ".join(sorted(before)) + " kept"
        if await store.refresh(key, new.last_modified - 3600):
            detail = f"{kept}; copy conditions ignored: readers in several processes may each copy a hot object"
            return Check("refresh", WARN, detail, "harmless: one more copy per object and process per refresh_after")
        return Check("refresh", PASS, f"{kept}; a refresh of an object modified since is declined")
    except AccessDeniedError as exc:
        return Check("refresh", WARN, str(exc)[:200], f"{denied_fix}, or {FALLBACK}")
    except StoreError as exc:
        return Check("refresh", WARN, f"this store cannot refresh objects: {str(exc)[:160]}", FALLBACK)
    finally:
        with contextlib.suppress(StoreError):
            await store.delete(key)
