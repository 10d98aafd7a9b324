"""HEAD requests without botocore's per-call pipeline, for the wave of probes of a lookup."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from yarl import URL

from .settings import S3Settings

log = logging.getLogger(__name__)


class DirectHead:
    """HEADs sent with aiohttp and signed with botocore's SigV4 signer, without botocore's
    per-call pipeline, whose CPU cost per call dominates a wave of HEADs on one loop thread
    (figures in the README, "Performance").

    Only clear answers are taken (200: present, 404: absent). Anything else (403, a
    redirect, a 5xx, a connection error) is asked again through botocore, which owns
    retries, redirects and error reporting; a connection error also turns this path off.
    """

    _PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

    def __init__(self, base_url: str, region: str, credentials: Any, settings: S3Settings) -> None:
        self._base = base_url.rstrip("/") + "/"
        self._region = region
        self._credentials = credentials
        ssl_context: ssl.SSLContext | bool = False
        if settings.verify:
            ssl_context = ssl.create_default_context(cafile=settings.ca_bundle)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.concurrency, ssl=ssl_context),
            timeout=aiohttp.ClientTimeout(sock_connect=settings.connect_timeout, sock_read=settings.read_timeout),
            auto_decompress=False,
        )
        self.enabled = True

    @classmethod
    def usable(cls) -> bool:
        """Not through a proxy: botocore's proxy handling stays in charge there."""
        return not any(os.environ.get(name) for name in cls._PROXY_VARIABLES)

    async def head(self, name: str) -> tuple[bool, tuple[int, float] | None]:
        """``(answered, found)``: found is ``(size, last_modified)`` or ``None`` if absent; not
        answered means ask again through botocore."""
        url = self._base + quote(name, safe="/~")
        request = AWSRequest(method="HEAD", url=url)
        S3SigV4Auth(await self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
        try:
            async with self._http.head(URL(url, encoded=True), headers=dict(request.headers.items())) as response:
                if response.status == 404:
                    return True, None
                if response.status != 200:
                    return False, None
                modified = parsedate_to_datetime(response.headers["Last-Modified"]).timestamp()
                return True, (int(response.headers["Content-Length"]), modified)
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError, TypeError):
            self.enabled = False
            log.info("direct HEADs turned off after a failure; HEADs go through botocore", exc_info=True)
            return False, None

    async def close(self) -> None:
        await self._http.close()
