"""Retry-After in every form RFC 9110 lets a server send, a bad value as "no hint", and the client using it."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrain_uploader.client import ApiError, Client
from retrain_uploader.emulator import Emulator
from retrain_uploader.retry_after import parse_retry_after

from .conftest import KEYS

NOW = datetime(1994, 11, 6, 8, 49, 7, tzinfo=UTC)  # 30 s before the RFC's example date


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("  0 ", 0.0),
        ("0.3", 0.3),
        ("9" * 40, 1e12),  # absurdly long: "very long", capped by the policy (int() of it would raise)
        ("Sun, 06 Nov 1994 08:49:37 GMT", 30.0),  # IMF-fixdate
        ("Sunday, 06-Nov-94 08:49:37 GMT", 30.0),  # obsolete RFC 850
        ("Sun Nov  6 08:49:37 1994", 30.0),  # obsolete asctime
        ("Sun, 06 Nov 1994 08:49:37 -0000", 30.0),  # raised TypeError (naive minus aware)
        ("Sun, 06 Nov 1994 08:49:37 +0000", 30.0),
        ("Sun, 06 Nov 1994 17:49:37 +0900", 30.0),
        ("Sun, 06 Nov 1994 08:49:37", 30.0),  # no zone: an HTTP-date is UTC
        ("Sun, 06 Nov 1994 08:00:00 GMT", 0.0),  # in the past: now
        ("-5", None),
        ("1e3", None),
        ("nan", None),
        ("inf", None),
        ("٣", None),  # a non-ASCII digit
        ("", None),
        ("soon", None),
        ("Sun, 31 Feb 1994 08:49:37 GMT", None),
        ("Sun, 06 Nov 1994 25:49:37 GMT", None),
        ("Sun, 06 Foo 1994 08:49:37 GMT", None),
    ],
)
def test_retry_after_forms(value: str, seconds: float | None) -> None:
    result = parse_retry_after(value, NOW)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


@given(st.text(max_size=300))
def test_any_string_is_seconds_or_no_hint(value: str) -> None:
    result = parse_retry_after(value, NOW)
    assert result is None or (math.isfinite(result) and result >= 0)


@given(st.integers(min_value=0, max_value=10**7), st.booleans())
def test_a_formatted_date_round_trips(delta_s: int, gmt: bool) -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=delta_s), usegmt=gmt)
    assert parse_retry_after(header, now) == pytest.approx(delta_s)


async def test_the_client_turns_a_minus_0000_date_into_a_delay(emulator: Emulator) -> None:
    when = datetime.now(UTC) + timedelta(seconds=90)
    emulator.inject("status", "http_status", status=503, retry_after=when.strftime("%a, %d %b %Y %H:%M:%S -0000"))
    client = Client(emulator.base_url, request_timeout_s=2)
    try:
        with pytest.raises(ApiError) as info:
            await client.get_status(next(iter(KEYS)), "some-job")
    finally:
        await client.close()
    assert info.value.http_status == 503
    assert info.value.retry_after is not None
    assert 80 <= info.value.retry_after <= 90
