"""Review round s6 (issue 13's CPU work, commits 16ed6f2 and 67da27a): two behaviour changes, each test failing before
its fix."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from retrain_uploader.clock import iso_utc
from retrain_uploader.emulator import Emulator

from .conftest import drop
from .test_cli import StartDaemon
from .test_metrics import get, samples
from .test_service import CSV, SENT


async def test_an_upload_confirmed_only_by_the_status_check_adds_no_duration_series(
    start_daemon: StartDaemon, emulator: Emulator
) -> None:
    """The PUT's answer is lost, the status check says it arrived: no PUT was timed, so /metrics shows the upload
    but no duration histogram for the model (the cached children made one, all zero, at the first upload)."""
    emulator.inject("put", "drop", after_body=True)
    d = await start_daemon(metrics={"enabled": True, "port": 0})
    assert d.service.metrics_port
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.state in SENT
    assert [e["detail"] for e in d.events(job.id) if e["event"] == "uploaded"] == [{"confirmed_by_status": True}]
    status, text, _ = await get(d.service.metrics_port, "/metrics")
    assert status == 200
    got = samples(text)
    assert got[f'retrain_uploader_uploads_total{{model="{job.model}"}}'] == 1
    assert not [name for name in got if name.startswith("retrain_uploader_upload_duration_seconds")], text


def test_iso_utc_is_datetimes_text_for_years_below_1000_too() -> None:
    """strftime's %Y gave "1-01-01T..." and "999-..." (glibc pads no year to 4 digits); isoformat gives "0001-..."."""
    rng = random.Random(13)
    first, year_1000 = -62135596800, -30610224000  # 0001-01-01 and 1000-01-01, 00:00 UTC
    stamps = [first, first + 0.5, year_1000 - 0.0000005, year_1000 - 1.25, 0.0, 1765000000.9999995]
    stamps += [rng.uniform(first, year_1000) for _ in range(200)]
    for t in stamps:
        for digits, spec in ((3, "milliseconds"), (6, "microseconds")):
            want = datetime.fromtimestamp(t, UTC).isoformat(timespec=spec).replace("+00:00", "Z")
            assert iso_utc(t, digits) == want, (t, digits)
