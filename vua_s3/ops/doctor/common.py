"""What every backend's doctor shares: the table's rows and the cache's own end-to-end check."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from ...config import VUAConfig
from ...errors import AccessDeniedError, StoreError
from ...keys import LAYOUT_VERSION
from ...storage import Store
from ...vua import AsyncVUA

PASS, WARN, FAIL, SKIP = "pass", "warn", "FAIL", "skip"


@dataclass
class Check:
    """One line of the doctor's table."""

    name: str
    status: str
    detail: str
    fix: str = ""


def format_checks(checks: list[Check]) -> str:
    """The doctor's table: one row per check, then the fixes for what failed."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail"]
    lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in checks]
    fixes = [c for c in checks if c.fix and c.status in (FAIL, WARN)]
    if fixes:
        lines.append("")
        lines += [f"fix {c.name}: {c.fix}" for c in fixes]
    return "\n".join(lines)


async def fragment_round_trip(
    store: Store, *, denied_fix: str = "", cleanup: Callable[[list[str]], Awaitable[None]] | None = None
) -> Check:
    """The cache itself, end to end: one group of a two-head KV cache stored in the current
    format (one object per KV head), looked up, read back and compared bit for bit, then
    deleted. ``denied_fix`` is the fix for a refusal once plain put, get and delete work;
    ``cleanup`` removes what deleting the keys leaves (empty directories)."""
    config = VUAConfig(split_factor=16, namespace=f"vua-doctor-{uuid.uuid4().hex[:12]}")
    tokens = torch.arange(16)
    kv = [(torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8))]
    keys = config.tokens_to_paths(tokens, kv_heads=2)
    vua = AsyncVUA(config, store, strict=True)
    try:
        await vua.put(tokens, kv)
        found = await vua.lookup(tokens)
        hit = await vua.get_closest(tokens)
        if found != 16 or hit is None or not all(torch.equal(a, b) for a, b in zip(hit.data[0], kv[0], strict=True)):
            return Check("fragments", FAIL, "stored objects did not read back intact", "report this as a bug")
        detail = f"format {LAYOUT_VERSION}: {len(keys)} objects (one per KV head), lookup and round trip"
        return Check("fragments", PASS, detail)
    except StoreError as exc:
        fix = denied_fix if isinstance(exc, AccessDeniedError) and denied_fix else "fix the failures above first"
        return Check("fragments", FAIL, str(exc)[:200], fix)
    finally:
        for key in keys:
            with contextlib.suppress(StoreError):
                await store.delete(key)
        if cleanup is not None:
            await cleanup(keys)
        await vua.close()
