"""Progress of a long PUT: `upload.progress` lines, the ledger's bytes_sent shown by `status`, and STATUS= text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from structlog.testing import capture_logs

from retrain_uploader.admin import collect
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import AFTER_UPLOAD, Ledger
from retrain_uploader.progress import measure

from .conftest import drop, wait_for


def test_measure_rate_eta_and_percent() -> None:
    p = measure("a.csv", 3_000_000, 10_000_000, previous=1_000_000, interval_s=2.0)
    assert (p.bytes_sent, p.percent, p.rate_bytes_s, p.eta_s) == (3_000_000, 30.0, 1e6, 7.0)
    assert p.text() == "a.csv 30% at 1.0 MB/s, 7 s left"
    stalled = measure("a.csv", 5, 10, previous=5, interval_s=1.0)
    assert stalled.rate_bytes_s == 0 and stalled.eta_s is None
    assert measure("e", 0, 0, previous=0, interval_s=0).percent == 100.0


async def test_a_long_put_reports_its_progress_in_the_log_the_ledger_and_the_status(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    size = 3_000_000
    body = "id,x\n" + "".join(f"{i},{i * 3}\n" for i in range(size // 12))
    with capture_logs() as logs:
        d = await start_daemon(upload={"max_bytes_per_s": 1_000_000}, logging={"progress_s": 0.25})
        drop(d.inbox(), "a.csv", body)

        def in_flight() -> Any:
            with Ledger(d.settings.ledger.path) as ledger:
                report = collect(d.settings, ledger)
            [alpha] = [m for m in report["models"] if m["model"] == "alpha"]
            return [u for u in alpha["uploading"] if u["bytes_sent"]]

        [shown] = await wait_for(in_flight, what="status showing the upload in flight with its bytes_sent")
        assert 0 < shown["bytes_sent"] < shown["size_bytes"] and shown["file"] == "a.csv"
        assert "uploading a.csv" in d.service.summary()  # what STATUS= says
        [job] = await d.closed_jobs(1, timeout=20)
    assert job.state in AFTER_UPLOAD and job.bytes_sent == job.size_bytes
    progress = [e for e in logs if e["event"] == "upload.progress"]
    assert len(progress) >= 4
    sent = [e["bytes_sent"] for e in progress]
    assert sent == sorted(sent) and 0 < sent[0] < sent[-1] < job.size_bytes
    middle = progress[len(progress) // 2]
    assert 0.5e6 < middle["rate_bytes_s"] < 1.5e6  # the cap, measured from the meter
    assert middle["eta_s"] is not None and 0 < middle["percent"] < 100
    assert all(e["job_id"] == job.id and e["size_bytes"] == job.size_bytes for e in progress)
    assert "uploading" not in d.service.summary()
