"""Canonical bytes of what an integration's identity digest covers: the same in every process
(the scheduler and each worker of an engine derive it apart), never a repr with an address."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

#: HF config entries that name where or by which library version a config was read, or how
#: attention is computed (an implementation of the same math), not what the model is.
NOT_CONFIG = frozenset(
    {"_name_or_path", "_commit_hash", "transformers_version", "_attn_implementation", "_attn_implementation_autoset"}
)


def canonical(value: Any) -> bytes:
    """Sorted, compact JSON of ``value``; configuration objects as their fields."""
    return json.dumps(value, sort_keys=True, default=_plain, separators=(",", ":")).encode()


def config_dict(config: Any) -> Any:
    """A Hugging Face config's ``to_dict()``, nested configs included, without :data:`NOT_CONFIG`."""
    return _without(config.to_dict())


def _without(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without(v) for k, v in value.items() if k not in NOT_CONFIG}
    if isinstance(value, (list, tuple)):
        return [_without(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    for method in ("model_dump", "to_dict"):
        if callable(getattr(value, method, None)):
            return getattr(value, method)()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v).decode() for v in value)
    text = str(value)
    if " at 0x" in text:
        raise TypeError(f"a {type(value).__name__} in the model's configuration has no stable form to hash")
    return text
