"""Reading the connector's objects with the VUA API: its namespace's identity, from the manifest.

Imported by the engine tests and by the helper scripts they run in the vLLM venv.
"""

from __future__ import annotations

import asyncio

from vua_s3 import VUAConfig
from vua_s3.manifest import list_manifests
from vua_s3.storage import open_store


def connector_config(location: str, namespace: str, split_factor: int) -> VUAConfig:
    """The config that reads (and writes) what a connector stored under ``namespace``."""

    async def identities() -> list[str]:
        store = open_store(location)
        try:
            return [m.identity for m in await list_manifests(store, namespace)]
        finally:
            await store.close()

    found = asyncio.run(identities())
    assert len(found) == 1, f"{namespace} has manifests of {found}"
    return VUAConfig(split_factor=split_factor, namespace=namespace, identity=found[0])
