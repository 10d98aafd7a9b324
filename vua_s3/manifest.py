"""Identity manifests: a small JSON object per namespace and identity, naming in readable form
what the identity's digest covers (model, weights, dtypes, layout), so people listing a store
see which deployment wrote what.

Key: ``<namespace>/identity-<sha256(identity)[:16]>.json``, beside the fragment fan-out
directories. It is not a fragment key, so reads never ask for it and ``gc`` never deletes it; one
per identity, so two deployments that share a hand-typed namespace both show. Written once, when
missing, by the integrations at start-up; a failed write costs nothing but the listing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import ObjectNotFoundError
from .storage.base import Store

_NAME_RE = re.compile(r"^identity-[0-9a-f]{16}\.json$")
#: Larger objects under a manifest's name are not read: a manifest is a few hundred bytes.
MAX_MANIFEST_BYTES = 64 * 1024


@dataclass(frozen=True)
class Manifest:
    """A namespace, the identity its objects carry, and the readable inputs the identity covers."""

    namespace: str
    identity: str
    inputs: dict[str, Any]


def manifest_key(namespace: str, identity: str) -> str:
    return f"{namespace}/identity-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"


def is_manifest_key(key: str) -> bool:
    namespace, _, name = key.partition("/")
    return bool(namespace) and _NAME_RE.match(name) is not None


def encode(manifest: Manifest) -> bytes:
    body = {"namespace": manifest.namespace, "identity": manifest.identity, "inputs": manifest.inputs}
    return json.dumps(body, indent=1, default=str).encode()


def decode(data: bytes) -> Manifest | None:
    """The manifest in ``data``, or ``None`` for anything else (a listing shows no garbage)."""
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
        return None
    namespace, identity = body.get("namespace"), body.get("identity")
    if not isinstance(namespace, str) or not isinstance(identity, str):
        return None
    return Manifest(namespace, identity, body["inputs"])


async def write_manifest(store: Store, manifest: Manifest) -> bool:
    """Write ``manifest`` unless its key exists already; whether it was written."""
    key = manifest_key(manifest.namespace, manifest.identity)
    if (await store.head_many([key]))[0] is not None:
        return False
    await store.put(key, encode(manifest))
    return True


async def read_manifest(store: Store, key: str) -> Manifest | None:
    """The manifest at ``key``; ``None`` if it is gone, too large or not a manifest."""
    try:
        info = (await store.head_many([key]))[0]
        if info is None or info.size > MAX_MANIFEST_BYTES:
            return None
        return decode(bytes(await store.get(key)))
    except ObjectNotFoundError:
        return None


async def list_manifests(store: Store, namespace: str) -> list[Manifest]:
    """Every readable manifest of ``namespace``: one per identity that wrote there."""
    found = []
    async for info in store.list(f"{namespace}/identity-"):
        if is_manifest_key(info.key) and (manifest := await read_manifest(store, info.key)) is not None:
            found.append(manifest)
    return found
