"""Keep credentials out of every line we write: API keys and presigned URL query strings."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

__all__ = ["redact_url", "register_secret", "scrub", "structlog_processor"]

_URL_QUERY = re.compile(r"(https?://[^\s?#\"'<>]+)\?[^\s\"'<>]*", re.IGNORECASE)
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(secret: str) -> None:
    """Remember a value (an API key) that must never be written anywhere."""
    if len(secret) >= 4:
        with _lock:
            _secrets.add(secret)


def redact_url(url: str) -> str:
    """The URL without its query string: a presigned URL's query is the credential."""
    base, sep, _ = url.partition("?")
    return base + ("?<redacted>" if sep else "")


def scrub(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with URL query strings and every registered secret replaced."""
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    with _lock:
        secrets = [*_secrets, *extra]
    for secret in sorted(secrets, key=len, reverse=True):
        if secret and secret in text:
            text = text.replace(secret, "<redacted>")
    return text


def structlog_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor applying :func:`scrub` to every string value (and exception text)."""
    for key, value in list(event_dict.items()):
        if isinstance(value, str):
            event_dict[key] = scrub(value)
    return event_dict
