"""A local S3 server for the tools that need one (the bench, the soak): SeaweedFS where its
binary is installed, else embedded moto."""

from __future__ import annotations

import logging

from .moto import EmbeddedS3
from .seaweed import SeaweedS3, seaweed_available


def local_s3(kind: str = "auto") -> tuple[EmbeddedS3, str]:
    """A not yet started server of ``kind`` (``auto``, ``seaweedfs`` or ``moto``) and its description."""
    if kind == "auto":
        kind = "seaweedfs" if seaweed_available() else "moto"
    if kind == "seaweedfs":
        return SeaweedS3(), "SeaweedFS (weed server, local, 127.0.0.1)"
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    return EmbeddedS3(), "moto (embedded, 127.0.0.1)"
