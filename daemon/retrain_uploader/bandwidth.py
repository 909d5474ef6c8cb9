"""Sharing the line: a weekly bandwidth timetable and one token bucket shared by every PUT body.

A rule is ``[DAYS] [HH:MM-HH:MM] RATE``: ``"Mon-Fri 08:00-19:00 2MB/s"``, ``"Sat-Sun unlimited"``, ``"closed"``.
The first rule that matches the local time wins; none matching means the default cap (``max_bytes_per_s``).
A time range that crosses midnight belongs to the day it starts on (``Fri 22:00-06:00`` holds until Sat 06:00).

Parsing and evaluation are pure, with the time passed in. :class:`TokenBucket` is the shared cap;
:class:`UploadWindow` follows the timetable with an injectable wall clock and sets the bucket's rate at each change.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from zoneinfo import ZoneInfo

import structlog

__all__ = [
    "CLOSED",
    "Rule",
    "ScheduleError",
    "Timetable",
    "TokenBucket",
    "UploadWindow",
    "WindowClosed",
    "describe_rate",
    "parse_rate",
    "parse_rule",
]

log = structlog.get_logger("retrain_uploader.bandwidth")

CLOSED = 0  # a rule's rate of 0 bytes/s: no new PUT starts
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_HINT = "days are Mon Tue Wed Thu Fri Sat Sun, a range like Mon-Fri or a list like Mon,Wed,Sat-Sun"
_RATE = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[kKMG]i?)?B/s")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_WHOLE_DAY = (0, 24 * 60)


class ScheduleError(ValueError):
    """A rule (or rate) that cannot be read; the message quotes the part at fault."""


class WindowClosed(Exception):
    """The window closed with ``on_close = "abort"``: the PUT body must stop before its last byte."""


@dataclass(frozen=True, slots=True)
class Rule:
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes since midnight
    end: int  # minutes since midnight, up to 1440; end < start crosses midnight
    rate: int | None  # bytes/s; None = unlimited; CLOSED = closed
    text: str

    def matches(self, local: datetime) -> bool:
        day, minute = local.weekday(), local.hour * 60 + local.minute
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Across midnight: the evening of a listed day, or the early hours of the day after one.
        return (day in self.days and minute >= self.start) or ((day - 1) % 7 in self.days and minute < self.end)


def parse_rate(text: str) -> int | None:
    """``"2MB/s"`` → 2000000; ``"unlimited"`` → None; ``"closed"`` → :data:`CLOSED`. KB/MB/GB are decimal,
    KiB/MiB/GiB binary; the B of bytes is a capital (``2Mb/s`` reads as megabits, so it is refused)."""
    word = text.strip()
    if word.lower() == "unlimited":
        return None
    if word.lower() == "closed":
        return CLOSED
    match = _RATE.fullmatch(word)
    if match is None:
        hint = "a byte rate such as 500KB/s, 2MB/s or 1.5GB/s, or unlimited, or closed"
        if re.search(r"\d\s*[kKmMgG]?i?(b/s|bps|bit)", word):
            hint = "a bit rate is not accepted: write bytes with a capital B, e.g. 2MB/s for 16 Mbit/s"
        raise ScheduleError(f'"{text}" is not a rate ({hint})')
    value = float(match["number"]) * _UNITS[(match["unit"] or "").lower()]
    if value < 1:
        raise ScheduleError(f'"{text}" is below 1 byte/s (to stop uploads, write closed)')
    return int(value)


def describe_rate(rate: int | None) -> str:
    if rate is None:
        return "unlimited"
    if rate == CLOSED:
        return "closed"
    for unit, size in (("GB/s", 10**9), ("MB/s", 10**6), ("KB/s", 10**3)):
        if rate >= size:
            return f"{rate / size:g}{unit}"
    return f"{rate}B/s"


def _parse_days(token: str) -> frozenset[int]:
    days: set[int] = set()
    for part in token.lower().split(","):
        first, sep, last = part.partition("-")
        if first not in _DAYS or (sep and last not in _DAYS):
            raise ScheduleError(f'"{token}" is not a day range ({_DAY_HINT})')
        a = _DAYS.index(first)
        b = _DAYS.index(last) if sep else a
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # Fri-Mon wraps over the weekend
    return frozenset(days)


def _parse_times(token: str) -> tuple[int, int]:
    first, sep, last = token.partition("-")
    a, b = _TIME.fullmatch(first), _TIME.fullmatch(last)
    hint = "HH:MM-HH:MM, from 00:00 to 24:00, e.g. 08:00-19:00 or 22:00-06:00 across midnight"
    if not sep or a is None or b is None:
        raise ScheduleError(f'"{token}" is not a time range ({hint})')
    minutes = []
    for m in (a, b):
        hour, minute = int(m[1]), int(m[2])
        if minute > 59 or hour > 24 or (hour == 24 and minute != 0):
            raise ScheduleError(f'"{token}" is not a time range ({hint})')
        minutes.append(hour * 60 + minute)
    start, end = minutes
    if start == end:
        raise ScheduleError(f'"{token}" is an empty time range (for the whole day, leave the time out)')
    if start % 1440 == end % 1440:
        return _WHOLE_DAY  # 00:00-24:00
    return start % 1440, end


def parse_rule(text: str) -> Rule:
    """One timetable rule; raises :class:`ScheduleError` naming the part that cannot be read."""
    if not isinstance(text, str):
        raise ScheduleError(f"{text!r} is not a rule (a string like \"Mon-Fri 08:00-19:00 2MB/s\")")
    tokens = text.split()
    if not tokens:
        raise ScheduleError('"" is an empty rule (write e.g. "Mon-Fri 08:00-19:00 2MB/s", "Sat-Sun unlimited")')
    if len(tokens) > 3:
        raise ScheduleError(f'"{text}" has {len(tokens)} parts; a rule is [DAYS] [HH:MM-HH:MM] RATE')
    *when, rate_text = tokens
    days, (start, end) = frozenset(range(7)), _WHOLE_DAY
    if len(when) == 2:
        days, (start, end) = _parse_days(when[0]), _parse_times(when[1])
    elif when and when[0][:1].isdigit():
        start, end = _parse_times(when[0])
    elif when:
        days = _parse_days(when[0])
    return Rule(days, start, end, parse_rate(rate_text), " ".join(tokens))


@dataclass(frozen=True, slots=True)
class Timetable:
    """Rules in order (the first match wins), the rate when none matches, and the zone they are read in."""

    rules: tuple[Rule, ...] = ()
    default: int | None = None
    timezone: ZoneInfo | None = None  # None: the host's

    def local(self, now: datetime) -> datetime:
        return now.astimezone(self.timezone) if self.timezone is not None else now.astimezone()

    def rate_at(self, now: datetime) -> int | None:
        """Bytes/s allowed at ``now`` (an aware datetime): None = unlimited, :data:`CLOSED` = closed."""
        local = self.local(now)
        for rule in self.rules:
            if rule.matches(local):
                return rule.rate
        return self.default

    def changes(self, now: datetime) -> Iterator[tuple[datetime, int | None]]:
        """Each later moment, within the next 8 days, at which the rate changes, with the new rate."""
        if not self.rules:
            return
        local = self.local(now)
        marks = sorted({0} | {r.start for r in self.rules} | {r.end % 1440 for r in self.rules})
        current = self.rate_at(now)
        for offset in range(9):
            day = local.date() + timedelta(days=offset)
            for mark in marks:
                at = self._wall(day, mark)
                if at <= now:
                    continue
                rate = self.rate_at(at)
                if rate != current:
                    yield at, rate
                    current = rate

    def next_change(self, now: datetime) -> datetime | None:
        return next((at for at, _ in self.changes(now)), None)

    def opens_at(self, now: datetime) -> datetime | None:
        """``now`` if a PUT may start now, else when the window opens (None: no rule ever opens it)."""
        if self.rate_at(now) != CLOSED:
            return now
        return next((at for at, rate in self.changes(now) if rate != CLOSED), None)

    def _wall(self, day: date, minute: int) -> datetime:
        naive = datetime.combine(day, clock_time(minute // 60, minute % 60))
        return naive.replace(tzinfo=self.timezone) if self.timezone is not None else naive.astimezone()


class TokenBucket:
    """One byte-rate cap shared by every PUT body in the process; the rate can change at any moment.

    Senders ask for a piece at a time (:meth:`piece`, at most ~50 ms of the rate) and are served in turn. A piece
    is paid for after it is granted: the next sender waits until the debt is repaid at the current rate, so a rate
    change (or a cut) reaches a waiting sender at once. Idle time buys at most ``burst_s`` of the rate.
    """

    def __init__(
        self, rate: int | None = None, *, burst_s: float = 0.05, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst_s = burst_s
        self._monotonic = monotonic
        self._tokens = 0.0
        self._stamp = monotonic()
        self._cut = False
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    @property
    def rate(self) -> int | None:
        return self._rate

    def set_rate(self, rate: int | None, *, cut: bool = False) -> None:
        """Change the rate now; ``cut`` makes every sender still asking for a piece raise :class:`WindowClosed`."""
        if rate is not None and rate < 1:
            raise ValueError("a bucket's rate is at least 1 byte/s (closed is the window's business)")
        self._refill()
        self._rate, self._cut = rate, cut
        self._changed.set()
        self._changed = asyncio.Event()

    def piece(self, limit: int) -> int:
        """How many bytes to ask for at once: small enough that a rate change or a cut is felt within ~50 ms."""
        if self._rate is None:
            return limit
        return max(1024, min(limit, int(self._rate * self._burst_s)))

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes may go out; raises :class:`WindowClosed` if the window was cut."""
        if self._cut:
            raise WindowClosed
        if self._rate is None and not self._lock.locked():
            return
        async with self._lock:
            while True:
                if self._cut:
                    raise WindowClosed
                rate = self._rate
                if rate is None:
                    return
                self._refill()
                if self._tokens >= 0:
                    self._tokens -= n
                    return
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(-self._tokens / rate):
                        await changed.wait()

    def _refill(self) -> None:
        now = self._monotonic()
        if self._rate is None:
            self._tokens = 0.0
        else:
            self._tokens = min(self._rate * self._burst_s, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now


def _utc_now() -> datetime:
    return datetime.now(UTC)


class UploadWindow:
    """Follows a :class:`Timetable`: sets the bucket's rate at each change and says whether a PUT may start.

    While the timetable says closed, PUTs in flight go on at the default cap, or, with ``abort_on_close``, are cut
    before their last byte. ``on_open`` is called each time the window opens. ``now`` is the wall clock (aware);
    ``recheck_s`` bounds the sleep between evaluations, so a clock that jumps (or a test's) is followed too.
    """

    def __init__(
        self,
        timetable: Timetable,
        bucket: TokenBucket,
        *,
        abort_on_close: bool = False,
        now: Callable[[], datetime] = _utc_now,
        recheck_s: float = 60.0,
        on_open: Callable[[], None] | None = None,
    ) -> None:
        self.bucket = bucket
        self._timetable = timetable
        self._abort = abort_on_close
        self._now = now
        self._recheck_s = recheck_s
        self._on_open = on_open
        self._open: bool | None = None
        self._rate: int | None = None
        self._wake = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self._open is not False

    @property
    def timetable(self) -> Timetable:
        return self._timetable

    def opens_at(self) -> datetime | None:
        return self._timetable.opens_at(self._now())

    def apply(self, timetable: Timetable, *, abort_on_close: bool) -> None:
        """A new timetable (a reload): in force at once, for uploads in flight too."""
        self._timetable, self._abort = timetable, abort_on_close
        self.refresh()
        self._wake.set()

    def refresh(self) -> None:
        """Evaluate the timetable now and apply what it says."""
        now = self._now()
        rate = self._timetable.rate_at(now)
        is_open = rate != CLOSED
        flowing = rate if is_open else self._timetable.default  # a PUT that goes on after closing: the default cap
        if flowing == CLOSED:
            flowing = None
        self.bucket.set_rate(flowing, cut=not is_open and self._abort)
        was_open, self._open = self._open, is_open
        if is_open and was_open is False:
            log.info("upload.window_opened", rate=describe_rate(rate))
        elif not is_open and was_open is not False:
            at = self._timetable.opens_at(now)
            log.info(
                "upload.window_closed",
                opens_at=at.isoformat(timespec="minutes") if at else None,
                in_flight="abort" if self._abort else "finish",
            )
        elif is_open and rate != self._rate and was_open is not None:
            log.info("upload.rate_changed", rate=describe_rate(rate))
        self._rate = rate
        if is_open and was_open is False and self._on_open is not None:
            self._on_open()

    async def run(self, stop: asyncio.Event) -> None:
        """Re-evaluate at every change of the timetable (and at least every ``recheck_s``) until ``stop``."""
        while not stop.is_set():
            self.refresh()
            now = self._now()
            change = self._timetable.next_change(now)
            delay = self._recheck_s if change is None else min(self._recheck_s, (change - now).total_seconds())
            self._wake = wake = asyncio.Event()
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
            _, pending = await asyncio.wait(waits, timeout=max(delay, 0.0) + 0.001, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
