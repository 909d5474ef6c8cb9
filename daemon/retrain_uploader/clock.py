"""UTC timestamps in ISO 8601 with a ``Z``, as every log line and ledger column writes them, made cheaply.

Several are written per file the daemon handles (each log line, each ledger step): the date and time of day are
formatted once per second, only the fraction each time. The result is what ``datetime.fromtimestamp(t, UTC)`` gives
(rounded to the microsecond the same way), truncated to ``digits`` decimals.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

__all__ = ["iso_utc"]

_last: tuple[int | None, str] = (None, "")  # the last second formatted, and its text


def iso_utc(t: float, digits: int = 6) -> str:
    """``t`` (seconds since the epoch) as ``YYYY-MM-DDTHH:MM:SS.fffZ`` with ``digits`` (3 or 6) decimals."""
    global _last  # one entry, replaced whole: a reader in another thread sees an old pair or the new one, never a mix
    fraction, whole = math.modf(t)
    second, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    last = _last
    if last[0] != second:
        # isoformat, not strftime: glibc's %Y does not pad a year below 1000 to 4 digits ("999-...")
        day_time = datetime.fromtimestamp(second, UTC).replace(tzinfo=None).isoformat(timespec="seconds")
        last = _last = (second, day_time)
    if digits == 3:
        return f"{last[1]}.{micros // 1000:03d}Z"
    return f"{last[1]}.{micros:06d}Z"
