"""Keeps secrets out of log records and messages: botocore's DEBUG output carries request
signatures, access key ids and SSE-C keys, URLs can carry user:password, and a user debugging a
cache should not leak them."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

_REDACTIONS = [
    (re.compile(r"(Signature=)[0-9a-fA-F]{16,}"), r"\1***"),
    (re.compile(r"(Signature:\s*)[0-9a-f]{64}"), r"\1***"),
    (re.compile(r"(Credential=)[^/\s'\",&]+"), r"\1***"),
    (
        re.compile(r"(?i)(x-amz-server-side-encryption-customer-key(?!-md5)['\"]?\s*[:=]\s*b?['\"]?)[A-Za-z0-9+/=]+"),
        r"\1***",
    ),
    (re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[A-Za-z0-9+/=%]+"), r"\1***"),
    (re.compile(r"('SSECustomerKey':\s*)(b?'[^']*'|b?\"[^\"]*\")"), r"\1'***'"),
]
_PREFIXES = ("botocore", "aiobotocore", "boto3", "aioboto3", "urllib3")


def redact(text: str) -> str:
    """``text`` with signatures, access key ids, session tokens and SSE-C keys masked."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message when it holds something :func:`redact` masks."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


_FILTER = RedactingFilter()


def install() -> None:
    """Put the filter on every AWS SDK logger that exists now (a logger's filters see only
    its own records, so each module's logger needs one). Idempotent; called whenever a
    client is made, by which time the SDK modules that log requests are imported."""
    names = [name for name in logging.root.manager.loggerDict if name.split(".", 1)[0] in _PREFIXES]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def redact_url(url: str) -> str:
    """``url`` with any user:password part masked, safe to show in messages and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()
