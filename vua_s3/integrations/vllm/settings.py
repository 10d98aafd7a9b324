"""The connector's settings: ``kv_connector_extra_config``, checked once at start-up; which
requests can be keyed by their token ids. Pure: no vLLM import. (What the objects are valid
for, the namespace and identity: :mod:`.identity`.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...checks import optional_seconds, positive_int, positive_seconds
from ...config import DEFAULT_SPLIT_FACTOR

if TYPE_CHECKING:
    from vllm.v1.request import Request

CONNECTOR_NAME = "VUAS3Connector"


@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config``, checked once at start-up."""

    url: str
    split_factor: int = DEFAULT_SPLIT_FACTOR
    namespace: str | None = None
    model_id: str | None = None
    salt: str | None = None
    max_inflight: int = 8
    max_pending_save_bytes: int = 1 << 30
    flush_timeout_s: float = 60.0
    lookup_timeout_s: float = 5.0
    lookup_wait_s: float = 0.02
    """How long the scheduler waits for a new request's lookup, counted from its arrival,
    before scheduling without it (the request then misses one step); 0 never waits."""
    load_timeout_s: float = 30.0
    breaker_backoff_s: float = 10.0
    breaker_max_backoff_s: float = 300.0
    load_failure_policy: str = "recompute"
    refresh_after: float | None = None
    """Seconds: loads re-stamp what they read once older (``AsyncVUA(refresh_after=)``); off by default."""
    known_stored_ttl_s: float = 30.0
    """How long groups a lookup or load found stored are trusted without asking again."""
    known_stored_max: int = 16384
    """The most groups trusted at once (the least recently found are forgotten first)."""
    kv_events_medium: str = "vua_s3"
    """The ``medium`` of the KV events (``BlockStored``) published for groups stored, when
    vLLM's KV events are on: names this tier to routers that place requests by cache contents."""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> ConnectorSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"{CONNECTOR_NAME}: unknown kv_connector_extra_config keys {unknown}; known: {sorted(known)}"
            )
        if not extra.get("url"):
            raise ValueError(
                f'{CONNECTOR_NAME} needs kv_connector_extra_config {{"url": "s3://bucket/prefix"}} (or a path)'
            )
        settings = cls(**extra)
        for name in ("split_factor", "max_inflight", "max_pending_save_bytes", "known_stored_max"):
            positive_int(f"{CONNECTOR_NAME}: {name}", getattr(settings, name))
        for name in ("flush_timeout_s", "lookup_timeout_s", "load_timeout_s", "breaker_backoff_s",
                     "breaker_max_backoff_s", "known_stored_ttl_s"):  # fmt: skip
            positive_seconds(f"{CONNECTOR_NAME}: {name}", getattr(settings, name))
        optional_seconds(f"{CONNECTOR_NAME}: refresh_after", settings.refresh_after)
        wait = settings.lookup_wait_s
        if type(wait) not in (int, float) or not 0 <= wait < settings.lookup_timeout_s:
            raise ValueError(f"{CONNECTOR_NAME}: lookup_wait_s must be from 0 to lookup_timeout_s, got {wait!r}")
        if not isinstance(settings.kv_events_medium, str) or not settings.kv_events_medium:
            raise ValueError(f"{CONNECTOR_NAME}: kv_events_medium must be a non-empty string")
        if settings.load_failure_policy not in ("recompute", "fail"):
            raise ValueError(f"{CONNECTOR_NAME}: load_failure_policy must be 'recompute' or 'fail'")
        return settings


def cacheable(request: Request) -> bool:
    """Whether token ids (and :func:`.identity.request_salt`) name the request's KV: not for
    ``prompt_embeds``, where placeholder ids stand in for embeddings."""
    return request.prompt_token_ids is not None and getattr(request, "prompt_embeds", None) is None
