"""vLLM integration: ``VUAS3Connector``, a V1 KV connector on vua_s3's storage.

Named in vLLM's configuration as ``"kv_connector_module_path": "vua_s3.integrations.vllm"``
with ``"kv_connector": "VUAS3Connector"``, or by the ``vllm.general_plugins`` entry point
(:func:`register`). vLLM is imported only when the connector is: ``connector`` and
``metrics`` import it; ``settings``, ``paged``, ``scheduler`` (lookups and plans),
``worker`` (loads and saves), ``plan``, ``breaker``, ``stats`` and ``problems`` are pure.
"""

from __future__ import annotations

from typing import Any

__all__ = ["VUAS3Connector", "register"]


def register() -> None:
    """vLLM plugin entry point: make ``"kv_connector": "VUAS3Connector"`` work without
    ``kv_connector_module_path``. Plugins load in every vLLM process, maybe twice."""
    from .connector import register as register_connector

    register_connector()


def __getattr__(name: str) -> Any:
    if name == "VUAS3Connector":
        from .connector import VUAS3Connector

        return VUAS3Connector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
