"""What can go wrong starting a local server."""

from __future__ import annotations

from ..errors import VUAError


class ServerNotFoundError(VUAError, RuntimeError):
    """A local server's program (SeaweedFS's ``weed``, moto, vLLM's venv) is not installed."""
