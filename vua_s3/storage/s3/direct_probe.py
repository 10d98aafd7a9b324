"""HEAD and LIST requests without botocore's per-call pipeline, for the waves of probes of a lookup."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

import aiohttp
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from yarl import URL

from .settings import S3Settings

log = logging.getLogger(__name__)


class DirectProbe:
    """HEADs and one-page LISTs sent with aiohttp and signed with botocore's SigV4 signer, without botocore's
    per-call pipeline, whose CPU cost per call dominates a wave of HEADs on one loop thread
    (``docs/lookups.md``).

    Only clear answers are taken (a HEAD's 200: present, 404: absent; a LIST's 200 with one
    complete page). Anything else (403, a redirect, a 5xx, a truncated listing, a
    connection error) is asked again through botocore, which owns retries, redirects,
    pagination and error reporting; a connection error also turns this path off.
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
            log.info("direct probes turned off after a failure; probes go through botocore", exc_info=True)
            return False, None

    async def list_page(self, prefix: str) -> tuple[bool, list[tuple[str, int, float]]]:
        """``(answered, objects)``: every object whose key starts with ``prefix`` as ``(key,
        size, last_modified)``, when one page holds them all; not answered means ask again
        through botocore."""
        url = f"{self._base}?list-type=2&prefix={quote(prefix, safe='~')}"
        request = AWSRequest(method="GET", url=url)
        S3SigV4Auth(await self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
        try:
            async with self._http.get(URL(url, encoded=True), headers=dict(request.headers.items())) as response:
                if response.status != 200:
                    return False, []
                body = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.enabled = False
            log.info("direct probes turned off after a failure; probes go through botocore", exc_info=True)
            return False, []
        try:
            return _listed(body)
        except (ElementTree.ParseError, KeyError, ValueError, TypeError):
            return False, []  # an answer this path does not understand: botocore reads it

    async def close(self) -> None:
        await self._http.close()


def _listed(body: bytes) -> tuple[bool, list[tuple[str, int, float]]]:
    """A ``ListBucketResult`` page as ``(complete, objects)``; incomplete pages are not taken."""
    root = ElementTree.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != f"{ns}ListBucketResult" or (root.findtext(f"{ns}IsTruncated") or "false").lower() == "true":
        return False, []
    objects = []
    for item in root.iter(f"{ns}Contents"):
        modified = item.findtext(f"{ns}LastModified") or ""
        when = datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp()
        objects.append((item.findtext(f"{ns}Key") or "", int(item.findtext(f"{ns}Size") or ""), when))
    return True, objects
