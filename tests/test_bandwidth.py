"""The bandwidth timetable (parsing, matching with the time passed in) and the shared cap on real PUTs.

Rates on the wire are measured on the server's side: the emulator's request log is timestamped as each PUT arrives,
and each completed upload carries the emulator's clock (``time.monotonic``) at its last byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrain_uploader.bandwidth import CLOSED, ScheduleError, Timetable, TokenBucket, parse_rate, parse_rule
from retrain_uploader.client import Client
from retrain_uploader.config import ConfigError, Settings
from retrain_uploader.emulator import Emulator

from .conftest import KEYS, wait_for

TOKYO = ZoneInfo("Asia/Tokyo")
KEY = next(iter(KEYS))


def at(day: int, hh: int, mm: int = 0) -> datetime:
    """Monday 2026-12-07 + ``day`` days, hh:mm in Tokyo."""
    return datetime(2026, 12, 7 + day, hh, mm, tzinfo=TOKYO)


# -- parsing --------------------------------------------------------------------------------------------------------
ALL = frozenset(range(7))


@pytest.mark.parametrize(
    ("text", "days", "start", "end", "rate"),
    [
        ("Mon-Fri 08:00-19:00 2MB/s", frozenset(range(5)), 480, 1140, 2_000_000),
        ("Mon-Fri 19:00-08:00 unlimited", frozenset(range(5)), 1140, 480, None),
        ("Sat-Sun unlimited", frozenset({5, 6}), 0, 1440, None),
        ("closed", ALL, 0, 1440, CLOSED),
        ("  CLOSED  ", ALL, 0, 1440, CLOSED),
        ("22:00-06:00 500KB/s", ALL, 1320, 360, 500_000),
        ("Fri-Mon 1.5GB/s", frozenset({4, 5, 6, 0}), 0, 1440, 1_500_000_000),
        ("mon,wed,Sat-Sun 1KiB/s", frozenset({0, 2, 5, 6}), 0, 1440, 1024),
        ("Tue 00:00-24:00 2MiB/s", frozenset({1}), 0, 1440, 2 << 20),
        ("Sun 18:00-24:00 100B/s", frozenset({6}), 1080, 1440, 100),
        ("8:30-9:00 3kB/s", ALL, 510, 540, 3000),
    ],
)
def test_rules_parse(text: str, days: frozenset[int], start: int, end: int, rate: int | None) -> None:
    rule = parse_rule(text)
    assert (rule.days, rule.start, rule.end, rule.rate) == (days, start, end, rate)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Mon-Fry 08:00-19:00 2MB/s", '"Mon-Fry" is not a day range'),
        ("Mon-Fry unlimited", '"Mon-Fry" is not a day range'),
        ("Monday unlimited", '"Monday" is not a day range'),
        ("Mon,,Fri unlimited", '"Mon,,Fri" is not a day range'),
        ("Mon 08:00-25:00 1MB/s", '"08:00-25:00" is not a time range'),
        ("Mon 08:00-19:60 1MB/s", '"08:00-19:60" is not a time range'),
        ("Mon 08:00 1MB/s", '"08:00" is not a time range'),
        ("Mon 08:00-08:00 1MB/s", '"08:00-08:00" is an empty time range'),
        ("Mon 08:00-19:00 2Mb/s", '"2Mb/s" is not a rate (a bit rate is not accepted'),
        ("Mon 08:00-19:00 2MB", '"2MB" is not a rate'),
        ("Mon 08:00-19:00", '"08:00-19:00" is not a rate'),
        ("0MB/s", '"0MB/s" is below 1 byte/s (to stop uploads, write closed)'),
        ("", '"" is an empty rule'),
        ("Mon 08:00-19:00 2 MB/s", '"Mon 08:00-19:00 2 MB/s" has 4 parts'),
        ("Mon-Fri 2MB/s 08:00-19:00", '"2MB/s" is not a time range'),
    ],
)
def test_bad_rules_say_which_part(text: str, message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_rule(text)
    assert str(caught.value).startswith(message)


_TOKENS = st.sampled_from(
    ["Mon", "Fri", "Mon-Fri", "Sat-Sun", "sun", "Fri-Mon", "Mon,Wed", "08:00-19:00", "22:00-06:00", "24:00-00:00",
     "7:5-8:00", "2MB/s", "1.5GB/s", "500KB/s", "0B/s", "unlimited", "closed", "-", ":", ",", "", "1e3B/s", "KB/s"]
)


@given(st.one_of(st.text(max_size=40), st.lists(_TOKENS, max_size=4).map(" ".join)))
def test_any_string_is_a_rule_or_a_clear_error(text: str) -> None:
    try:
        rule = parse_rule(text)
    except ScheduleError as e:
        message = str(e)
        assert message.startswith('"') and (" is " in message or " has " in message)
        return
    assert rule.days and 0 <= rule.start < 1440 and 0 < rule.end <= 1440 and rule.start != rule.end
    assert rule.rate is None or rule.rate >= 0
    assert parse_rule(rule.text) == rule  # the normalised text reads back the same


@given(st.integers(min_value=1, max_value=10**12))
def test_rates_read_back(rate: int) -> None:
    assert parse_rate(f"{rate}B/s") == rate


# -- matching, with the time passed in -----------------------------------------------------------------------------
OFFICE = Timetable(
    tuple(parse_rule(r) for r in ("Mon-Fri 08:00-19:00 2MB/s", "Fri 22:00-06:00 closed", "Sat-Sun unlimited")),
    default=5_000_000,
    timezone=TOKYO,
)


@pytest.mark.parametrize(
    ("now", "rate"),
    [
        (at(0, 7, 59), 5_000_000),  # Monday before office hours: no rule, the default cap
        (at(0, 8, 0), 2_000_000),  # a range includes its start...
        (at(0, 18, 59), 2_000_000),
        (at(0, 19, 0), 5_000_000),  # ...and excludes its end
        (at(4, 21, 59), 5_000_000),
        (at(4, 22, 0), CLOSED),  # Friday evening
        (at(5, 3, 0), CLOSED),  # the early hours of Saturday still belong to Friday's range (first match wins)
        (at(5, 6, 0), None),  # then Saturday's rule
        (at(6, 23, 59), None),
        (at(7, 3, 0), 5_000_000),  # Monday night: Friday's range does not repeat
    ],
)
def test_rate_at(now: datetime, rate: int | None) -> None:
    assert OFFICE.rate_at(now) == rate
    assert OFFICE.rate_at(now.astimezone(ZoneInfo("UTC"))) == rate  # read in the timetable's zone, whatever it is


def test_day_range_wraps_over_the_weekend() -> None:
    table = Timetable((parse_rule("Fri-Mon 23:00-01:00 1KB/s"),), timezone=TOKYO)
    assert [table.rate_at(at(d, 0, 30)) for d in range(7)] == [1000, 1000, None, None, None, 1000, 1000]
    assert [table.rate_at(at(d, 23, 30)) for d in range(7)] == [1000, None, None, None, 1000, 1000, 1000]


def test_next_change_and_opening() -> None:
    assert OFFICE.next_change(at(0, 7, 0)) == at(0, 8, 0)
    assert OFFICE.next_change(at(0, 8, 0)) == at(0, 19, 0)
    assert OFFICE.opens_at(at(0, 9, 0)) == at(0, 9, 0)  # open now
    assert OFFICE.opens_at(at(4, 23, 0)) == at(5, 6, 0)  # closed Friday night → Saturday 06:00
    assert Timetable((parse_rule("closed"),)).opens_at(at(0, 9, 0)) is None  # never opens
    assert Timetable().next_change(at(0, 9, 0)) is None


def test_timetable_follows_the_zone_across_dst() -> None:
    utc = ZoneInfo("UTC")
    paris = Timetable((parse_rule("Sun 03:00-04:00 closed"),), timezone=ZoneInfo("Europe/Paris"))
    before = datetime(2026, 3, 29, 0, 30, tzinfo=utc)  # 01:30 CET; at 02:00 the clocks jump to 03:00 CEST
    assert paris.rate_at(before) is None
    assert paris.next_change(before) == datetime(2026, 3, 29, 1, 0, tzinfo=utc)  # 30 min later, not 90
    assert paris.rate_at(datetime(2026, 3, 29, 1, 30, tzinfo=utc)) == CLOSED  # 03:30 CEST


# -- configuration --------------------------------------------------------------------------------------------------
def _config(tmp_path: Path, upload: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[upload]\n{upload}\n[[models]]\nname = "a"\ninbox = "in"\napi_key_env = "K"\n')
    return path


@pytest.mark.parametrize(
    ("upload", "error"),
    [
        ('schedule = ["Mon-Fri 08:00-19:00 2MB/s", "Mon-Fry 19:00-08:00 unlimited"]',
         'upload.schedule[1]: "Mon-Fry" is not a day range'),
        ('schedule = ["closed", 7]', "upload.schedule[1]: Input should be a valid string"),
        ('timezone = "Asia/Tokio"', 'upload.timezone: "Asia/Tokio" is not an IANA time zone'),
        ('max_bytes_per_s = 0', "upload.max_bytes_per_s: Input should be greater than or equal to 1"),
        ('max_bytes_per_s = "closed"', "upload.max_bytes_per_s: closed is a schedule rule's rate, not a cap"),
        ('on_close = "pause"', "upload.on_close: Input should be 'finish' or 'abort'"),
        ('shedule = []', "upload.shedule: unknown key (misspelt?)"),
    ],
)
def test_config_errors_name_the_rule(tmp_path: Path, upload: str, error: str) -> None:
    path = _config(tmp_path, upload)
    with pytest.raises(ConfigError) as caught:
        Settings.from_toml(path)
    assert str(caught.value).startswith(f"{path}: {error}")


def test_config_builds_the_timetable(tmp_path: Path) -> None:
    upload = '\n'.join(
        ['max_bytes_per_s = "1.5MB/s"', 'schedule = ["Sat-Sun unlimited"]', 'timezone = "Asia/Tokyo"',
         'on_close = "abort"']
    )
    settings = Settings.from_toml(_config(tmp_path, upload))
    table = settings.upload.timetable()
    assert (table.default, table.timezone, settings.upload.on_close) == (1_500_000, TOKYO, "abort")
    assert (table.rate_at(at(0, 12)), table.rate_at(at(5, 12))) == (1_500_000, None)
    assert Settings.from_toml(_config(tmp_path, "")).upload.timetable() == Timetable()  # default: unlimited


# -- the cap on real PUTs, measured by the server --------------------------------------------------------------------
class TimedRequests(list[Any]):
    """Stands in for ``Emulator.requests``: its middleware appends each request as it arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.monotonic())
        super().append(item)


def measured(emulator: Emulator, timed: TimedRequests) -> list[tuple[float, float, int]]:
    """(arrival, last byte, size) of each completed PUT, on the server's side."""
    arrivals = {r.job_id: timed.times[i] for i, r in enumerate(timed) if r.endpoint == "put"}
    return [(arrivals[u.job_id], u.at, u.size) for u in emulator.uploads]


def csv_file(tmp_path: Path, name: str, size: int) -> tuple[Path, str]:
    data = (b"a,b\n" + b"12345,67890\n" * (size // 12 + 1))[:size]
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


async def put(client: Client, path: Path, sha256: str, size: int) -> None:
    ticket = await client.request_upload(KEY, path.name)
    await client.put_file(ticket.upload_url, path, size=size, sha256=sha256)


def received(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "emulator-store").glob("*.part"))


@pytest.fixture
def timed(emulator: Emulator) -> TimedRequests:
    emulator.requests = timed = TimedRequests()
    return timed


async def test_cap_holds_on_a_real_put(tmp_path: Path, emulator: Emulator, timed: TimedRequests) -> None:
    cap = 1_000_000
    path, sha = csv_file(tmp_path, "one.csv", 2_000_000)
    client = Client(emulator.base_url, throttle=TokenBucket(cap))
    try:
        await put(client, path, sha, 2_000_000)
    finally:
        await client.close()
    [(start, end, size)] = measured(emulator, timed)
    rate = size / (end - start)
    assert 0.85 * cap <= rate <= 1.06 * cap, f"{rate:.0f} B/s against a cap of {cap}"


async def test_parallel_puts_share_one_cap(tmp_path: Path, emulator: Emulator, timed: TimedRequests) -> None:
    cap = 1_500_000
    bucket = TokenBucket(cap)
    client = Client(emulator.base_url, throttle=bucket)
    files = [csv_file(tmp_path, f"p{i}.csv", 1_000_000) for i in range(3)]
    try:
        await asyncio.gather(*(put(client, path, sha, 1_000_000) for path, sha in files))
    finally:
        await client.close()
    puts = measured(emulator, timed)
    assert len(puts) == 3
    first, last = min(s for s, _, _ in puts), max(e for _, e, _ in puts)
    assert max(s for s, _, _ in puts) < min(e for _, e, _ in puts), "the three PUTs did not overlap"
    rate = sum(n for _, _, n in puts) / (last - first)
    assert 0.85 * cap <= rate <= 1.06 * cap, f"together {rate:.0f} B/s against a cap of {cap}"


async def test_a_rate_change_reaches_an_upload_in_flight(
    tmp_path: Path, emulator: Emulator, timed: TimedRequests
) -> None:
    bucket = TokenBucket(100_000)  # 2 MB would take 20 s at this rate
    path, sha = csv_file(tmp_path, "slow.csv", 2_000_000)
    client = Client(emulator.base_url, throttle=bucket)
    try:
        sending = asyncio.create_task(put(client, path, sha, 2_000_000))
        # Server side: the body arriving at the slow rate (the emulator writes it to a .part file as it comes).
        await wait_for(lambda: received(tmp_path) >= 50_000, what="50 kB to arrive")
        changed = time.monotonic()
        [arrived] = [timed.times[i] for i, r in enumerate(timed) if r.endpoint == "put"]
        assert changed - arrived > 0.3 and not emulator.uploads  # throttled: 50 kB took more than 0.3 s
        bucket.set_rate(None)
        await asyncio.wait_for(sending, timeout=5)
    finally:
        await client.close()
    [(start, end, size)] = measured(emulator, timed)
    assert start < changed < end and end - changed < 2.0 and size == 2_000_000


async def test_piece_size_follows_the_rate() -> None:
    bucket = TokenBucket(None)
    assert bucket.piece(64 << 10) == 64 << 10
    bucket.set_rate(100_000)
    assert bucket.piece(64 << 10) == 5000  # 50 ms of the rate: a change is felt at once
    bucket.set_rate(1000)
    assert bucket.piece(64 << 10) == 1024
    with pytest.raises(ValueError, match="at least 1 byte/s"):
        bucket.set_rate(CLOSED)
