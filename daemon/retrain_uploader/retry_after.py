"""``Retry-After`` header values, turned into seconds to wait. A pure function: the time of receipt is passed in.

Its own module (not ``policy``) because the client parses the header when the answer arrives, and ``policy``
imports the client: the imports keep running one way.
"""

from __future__ import annotations

import calendar
import re
from datetime import datetime
from email.utils import parsedate_tz

__all__ = ["parse_retry_after"]

# RFC 9110 delay-seconds is 1*DIGIT; a decimal fraction is accepted too (some servers and our emulator send one).
_DELAY = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
# More digits than this is "wait very long", which the policy caps anyway; int() of thousands of digits raises.
_MAX_DELAY_DIGITS = 12
_MAX_HEADER = 200


def parse_retry_after(value: str, now: datetime) -> float | None:
    """Seconds from ``now`` (timezone-aware) until the server wants to hear from us again, or None for no usable hint.

    Accepts delay-seconds and every HTTP-date form RFC 9110 allows a recipient to meet: IMF-fixdate
    (``Sun, 06 Nov 1994 08:49:37 GMT``), the obsolete RFC 850 (``Sunday, 06-Nov-94 08:49:37 GMT``) and asctime
    (``Sun Nov  6 08:49:37 1994``) forms, and numeric zones (``+0000``, ``-0000``, ``+0900``). A date without a zone
    is UTC, as every HTTP-date is. A date in the past means "now" (0.0). Never raises.
    """
    text = value.strip()
    if not text or len(text) > _MAX_HEADER:
        return None
    if _DELAY.fullmatch(text):
        whole = text.partition(".")[0].lstrip("0")
        if len(whole) > _MAX_DELAY_DIGITS:
            return float(10**_MAX_DELAY_DIGITS)
        return float(text)
    when = _http_date_timestamp(text)
    if when is None:
        return None
    return max(0.0, when - now.timestamp())


def _http_date_timestamp(text: str) -> float | None:
    try:
        parts = parsedate_tz(text)
    except (TypeError, ValueError, IndexError, OverflowError):  # it has raised on odd input in some Python versions
        return None
    if parts is None:
        return None
    year, month, day, hour, minute, second = parts[:6]
    offset = parts[9] or 0  # None: no zone or "-0000" ("UTC, source unknown"); an HTTP-date is UTC either way
    if not (1 <= month <= 12 and 1 <= day <= 31 and 0 <= hour <= 23 and 0 <= minute <= 59 and 0 <= second <= 60):
        return None
    if not 1 <= year <= 9999 or day > calendar.monthrange(year, month)[1]:
        return None
    return float(calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0)) - offset)
