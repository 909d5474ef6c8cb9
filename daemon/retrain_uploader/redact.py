"""Keep credentials out of every line we write: API keys, presigned URL query strings and signature parameters.

The text to clean is often not a plain URL: an error excerpt of a JSON body (``https:\\/\\/…\\u0026sig=…``), a
percent-encoded URL inside another one (``X-Amz-Signature%3D…``), HTML (``&amp;Signature=…``) or a rendered log line.
So :func:`scrub` works on patterns, not on parsed URLs, and errs on the side of removing too much.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections.abc import Iterable, MutableMapping
from typing import Any

__all__ = ["REDACTED", "redact_url", "register_secret", "scrub", "scrub_values"]

REDACTED = "<redacted>"

# A value already replaced is taken into the query, so a second pass (the value, then the line) changes nothing.
_QUERY = r"(?:[^\s\x00-\x1f\x7f\"'<>\\]|" + re.escape(REDACTED) + ")+"
# A URL's query string, with the scheme written plainly, JSON-escaped (`https:\/\/`) or doubly escaped. It ends at
# whitespace, a quote, `<`, `>` or a backslash (an escape such as `\"` or `\u0026` is left whole, so scrubbing a
# rendered JSON line keeps it valid JSON; parameters after such an escape are caught by _PARAM).
_URL_QUERY = re.compile(
    r"(?P<base>https?:(?:\\{0,2}/){2}[^\s?#\"'<>]*?)(?P<sep>\?|\\{1,2}u003f)" + _QUERY, re.IGNORECASE
)
# The same for a percent-encoded URL (`https%3A%2F%2F…%3F…`), once or twice encoded.
_ENCODED_URL_QUERY = re.compile(
    r"(?P<base>https?(?:%3a|%253a)(?:%2f|%252f){2}[^\s?#\"'<>\\]*?)(?P<sep>%3f|%253f)" + _QUERY, re.IGNORECASE
)
# Parameter names whose value is a credential, matched as a name suffix so vendor prefixes are covered:
# X-Amz-Signature, X-Goog-Signature, Signature (CloudFront, Authorization headers), sig (Azure SAS), X-Amz-Credential,
# Credential, X-Amz-Security-Token, access_token, AWSAccessKeyId, GoogleAccessId, Key-Pair-Id, x-api-key, ...
_CREDENTIAL_NAMES = (
    r"signature|sig|credentials?|security[-_]?token|token|access[-_]?key[-_]?id|access[-_]?id|key[-_]?pair[-_]?id"
    r"|api[-_]?key|secret|password"
)
# name=value in its spellings: `=` (a quoted value too: `password='…'` in a repr), percent-encoded once or twice,
# JSON `\u003d`, HTML `&#61;`, or a quoted key with a quoted value (`"sig": "…"`, `'sig': '…'`, `\"sig\": \"…\"`;
# `"token": 3` stays valid JSON) or a header (`x-amz-security-token: …`).
_SEPARATOR = (
    r"=\\{0,2}[\"']?|%3d|%253d|\\{1,2}u003d|&#0*61;|&#x0*3d;|\\{0,2}[\"'][ \t]*:[ \t]*\\{0,2}[\"']|[ \t]*:[ \t]*"
)
# A value ends where the next parameter starts (`&`, `&amp;`, `%26`, `\u0026`), or at whitespace, a control
# character (a terminal colour code), a quote, a backslash, `<>`, `,` `;` `#` `|` or a closing bracket.
# Signatures are hex or base64, which contain none of these.
_VALUE = r"(?:(?!%26|%2526)[^\s\x00-\x1f\x7f\"'<>\\&,;#)\]}|])+"
# The name starts after a character that cannot be part of it; a leading `26` of `%26`, `u0026` of `\u0026` or a
# vendor prefix such as `X-Amz-` is taken into the name and kept.
_PARAM = re.compile(
    rf"(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z0-9_.-]*?(?:{_CREDENTIAL_NAMES}))(?P<sep>{_SEPARATOR})(?P<value>{_VALUE})",
    re.IGNORECASE,
)

# An Authorization or Proxy-Authorization header's credentials, after its scheme (`Bearer`, `Basic`, ...), in a header,
# a dict's repr or JSON. A value already replaced is matched whole, so a second pass leaves the scheme alone.
_AUTHORIZATION = re.compile(
    r"(?P<head>(?<![A-Za-z0-9_-])(?:proxy-)?authorization\\{0,2}[\"']?[ \t]*[:=][ \t]*\\{0,2}[\"']?"
    r"(?:(?:bearer|basic|digest|negotiate|token)[ \t]+)?)(?:" + re.escape(REDACTED) + "|" + _VALUE + ")",
    re.IGNORECASE,
)

# Every pattern above and below needs one of these: a line without any (most log lines) skips them all. Looked for
# as substrings of the case-folded text, not by one IGNORECASE regex (12 us on a 250-character line, against 1.5 us).
# The folding matches what IGNORECASE does for these letters: casefold() takes U+017F (long s) to s and U+212A
# (Kelvin) to k; the two the patterns also take for i, U+0131 (dotless) and U+0130 (dotted capital, folded to i and a
# combining dot), are mapped to i.
_KEYWORDS = ("sig", "credential", "token", "access", "key", "secret", "password", "authorization", "http", "://")


def _maybe_secret(text: str) -> bool:
    folded = text.casefold()
    if "\u0131" in folded or "\u0307" in folded:
        folded = folded.replace("i\u0307", "i").replace("\u0131", "i")
    # One substring search per keyword, not one regex of them all: the regex tries its alternatives at every
    # character (4.6 us on a 300-character log line, this 1.8 us; two scrubs per line).
    for keyword in _KEYWORDS:  # noqa: SIM110 -- a loop, not any(...): no generator per line
        if keyword in folded:
            return True
    return False


# A URL's user information (`http://user:password@proxy:3128`): the password goes, the user stays.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:\"'<>\\]+:)[^\s/?#@\"'<>\\]+@")

_secrets: set[str] = set()
_ordered: tuple[str, ...] = ()  # _secrets, longest first: replaced in one assignment, read without the lock
_lock = threading.Lock()


def register_secret(secret: str) -> None:
    """Remember a value (an API key) that must never be written anywhere, in any of its usual encodings."""
    global _ordered  # one module-wide registry, swapped whole so readers need no lock
    if len(secret) >= 4:
        with _lock:
            _secrets.update(_spellings(secret))
            _ordered = tuple(sorted(_secrets, key=len, reverse=True))


def _spellings(secret: str) -> set[str]:
    """The secret as written plainly, JSON-escaped and percent-encoded (what a log line or URL would hold)."""
    return {secret, json.dumps(secret, ensure_ascii=False)[1:-1], urllib.parse.quote(secret, safe="")}


def redact_url(url: str) -> str:
    """The URL without its query string: a presigned URL's query is the credential."""
    base, sep, _ = url.partition("?")
    return base + (f"?{REDACTED}" if sep else "")


def scrub_values(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: :func:`scrub` on every string value (and exception text), before the line is rendered.

    The values are looked at together first, joined by newlines: no pattern and no registered secret spans a newline
    into the next value (a value ends at whitespace), so if the joined text needs nothing, no value does; a line
    then costs one scrub, not one per value.
    """
    keys = [key for key, value in event_dict.items() if isinstance(value, str)]
    joined = "\n".join(event_dict[key] for key in keys)
    if scrub(joined) != joined:
        for key in keys:
            event_dict[key] = scrub(event_dict[key])
    return event_dict


def scrub(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with URL query strings, credential parameters and every registered secret replaced.

    Applied to a rendered JSON line it keeps the line valid JSON: no replacement starts or ends inside an escape.
    """
    if _maybe_secret(text):
        text = _PARAM.sub(rf"\g<name>\g<sep>{REDACTED}", text)  # first: a URL query may end at an escaped `&`
        text = _AUTHORIZATION.sub(rf"\g<head>{REDACTED}", text)
        text = _USERINFO.sub(rf"\g<head>{REDACTED}@", text)
        text = _URL_QUERY.sub(rf"\g<base>\g<sep>{REDACTED}", text)
        text = _ENCODED_URL_QUERY.sub(rf"\g<base>\g<sep>{REDACTED}", text)
    secrets = _ordered
    extras = {s for secret in extra if secret for s in _spellings(secret)}
    if extras:
        secrets = tuple(sorted(extras.union(secrets), key=len, reverse=True))
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
