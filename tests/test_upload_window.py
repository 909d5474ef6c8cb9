"""The upload window end to end: the real service, the emulator, real files and ledger, and a wall clock the test
moves (``Service(now=...)``), so windows open and close without waiting for the real time of day."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog

from retrain_uploader.admin import collect, render
from retrain_uploader.config import Settings
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import Job, Ledger, State
from retrain_uploader.service import Service

from .conftest import drop, wait_for

TOKYO = ZoneInfo("Asia/Tokyo")
MONDAY = datetime(2026, 12, 7, tzinfo=TOKYO)  # a Monday
# 08:00-09:00 slow, 09:00-10:00 closed, otherwise (no rule) the default: unlimited.
SCHEDULE = ["Mon 08:00-09:00 100KB/s", "Mon 09:00-10:00 closed"]


class Clock:
    def __init__(self, hh: int, mm: int = 0) -> None:
        self.now = MONDAY.replace(hour=hh, minute=mm)

    def set(self, hh: int, mm: int = 0) -> None:
        self.now = MONDAY.replace(hour=hh, minute=mm)

    def __call__(self) -> datetime:
        return self.now


class Running:
    def __init__(self, service: Service, task: asyncio.Task[int], emulator: Emulator) -> None:
        self.service, self.task, self.emulator = service, task, emulator

    @property
    def settings(self) -> Settings:
        return self.service.settings

    def jobs(self) -> list[Job]:
        with Ledger(self.settings.ledger.path) as ledger:
            return ledger.jobs()

    def requests(self, endpoint: str) -> int:
        return sum(r.endpoint == endpoint for r in self.emulator.requests)


@pytest.fixture
async def start(
    tmp_path: Path, emulator: Emulator, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[..., Any]]:
    running: list[Running] = []

    async def go(clock: Clock, settings: Settings | None = None, **upload: Any) -> Running:
        settings = settings or make_settings(upload={"schedule": SCHEDULE, "timezone": "Asia/Tokyo", **upload})
        service = Service(settings, handle_signals=False, now=clock, window_recheck_s=0.02)
        task = asyncio.create_task(service.run())
        await wait_for(lambda: service.ready.is_set() or task.done(), what="the service to start")
        if task.done():
            task.result()
        running.append(Running(service, task, emulator))
        return running[-1]

    yield go
    for r in running:
        r.service.request_stop()
        await asyncio.wait_for(r.task, timeout=15)


def csv(size: int) -> bytes:
    return b"a,b\n" + b"12345,67890\n" * (size // 12)  # whole rows: about size bytes


def received(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "emulator-store").glob("*.part"))


async def test_closed_window_starts_no_put_and_status_says_when_it_opens(
    tmp_path: Path, start: Callable[..., Any]
) -> None:
    clock = Clock(9, 30)
    daemon: Running = await start(clock)
    drop(daemon.settings.model("alpha").inbox, "sales.csv", csv(10_000))
    await wait_for(lambda: daemon.service._window_waiting, what="the job to wait for the window")
    [job] = daemon.jobs()
    assert job.state is State.REQUESTING and job.sha256 is not None  # checked and hashed, but no URL asked for
    assert (daemon.requests("upload_url"), daemon.requests("put")) == (0, 0)
    assert "1 waiting for the upload window, opens at Mon 2026-12-07 10:00 Asia/Tokyo" in daemon.service.summary()

    with Ledger(daemon.settings.ledger.path) as ledger:
        report = collect(daemon.settings, ledger, now=clock())
    assert report["upload_window"] == {
        "open": False,
        "rate": "closed",
        "rate_bytes_per_s": 0,
        "opens_at": "2026-12-07T10:00+09:00",
        "text": "waiting for the upload window, opens at Mon 2026-12-07 10:00 Asia/Tokyo",
    }
    assert render(report).splitlines()[1] == f"upload: {report['upload_window']['text']}"

    with structlog.testing.capture_logs() as logs:
        clock.set(10, 0)
        [done] = await wait_for(lambda: [j for j in daemon.jobs() if j.closed], what="the upload once the window opens")
    assert done.state in (State.UPLOADED, State.RETRAINING, State.FINISHED)
    assert (daemon.requests("upload_url"), len(daemon.emulator.uploads)) == (1, 1)
    assert {"event": "upload.window_opened", "rate": "unlimited", "log_level": "info"} in logs


async def test_abort_cuts_the_put_before_its_last_byte_and_sends_it_again_once(
    tmp_path: Path, start: Callable[..., Any]
) -> None:
    clock = Clock(8, 30)  # 100 KB/s: 400 kB take 4 s
    daemon: Running = await start(clock, on_close="abort")
    data = csv(400_000)
    drop(daemon.settings.model("alpha").inbox, "big.csv", data)
    await wait_for(lambda: received(tmp_path) >= 50_000, what="the PUT to be under way")
    [job] = daemon.jobs()
    first_remote = job.retrain_job_id
    assert job.put_started == 1
    with structlog.testing.capture_logs() as logs:
        clock.set(9, 30)  # the window closes mid-PUT
        await wait_for(lambda: daemon.service._window_waiting, what="the cut job to wait for the window")
    [job] = daemon.jobs()
    assert (job.state, job.put_started) == (State.REQUESTING, 0)  # a known "not arrived": nothing to settle
    await wait_for(lambda: received(tmp_path) == 0, what="the emulator to drop the partial body")
    assert daemon.emulator.uploads == []  # the storage kept nothing: no retraining started
    [put] = [r for r in daemon.emulator.requests if r.endpoint == "put"]
    assert put.status != 200
    [cut] = [e for e in logs if e["event"] == "upload.cut_window_closed"]
    assert 50_000 <= cut["sent"] < len(data) and cut["retrain_job_id"] == first_remote

    clock.set(10, 30)  # open again, unlimited
    [done] = await wait_for(lambda: [j for j in daemon.jobs() if j.closed], what="the upload once the window opens")
    assert done.state is not State.FAILED and done.retrain_job_id != first_remote  # a fresh URL, a new remote job
    assert daemon.requests("upload_url") == 2
    [upload] = daemon.emulator.uploads
    assert (upload.job_id, upload.size) == (done.retrain_job_id, len(data))
    with Ledger(daemon.settings.ledger.path) as ledger:
        events = [e["event"] for e in ledger.events(done.id)]
    assert events.count("window_closed") == 1 and "outcome_unknown" not in events


async def test_finish_lets_the_put_in_flight_end_when_the_window_closes(
    tmp_path: Path, start: Callable[..., Any]
) -> None:
    clock = Clock(8, 30)
    daemon: Running = await start(clock)  # on_close defaults to finish; the default cap is unlimited
    drop(daemon.settings.model("alpha").inbox, "big.csv", csv(2_000_000))  # 20 s at 100 KB/s
    await wait_for(lambda: received(tmp_path) >= 50_000, what="the PUT to be under way")
    clock.set(9, 30)  # closed: the PUT goes on, at the default cap (unlimited), so it ends at once
    [done] = await wait_for(lambda: [j for j in daemon.jobs() if j.closed], timeout=5, what="the PUT to end")
    assert done.state is not State.FAILED
    assert (daemon.requests("upload_url"), daemon.requests("put"), len(daemon.emulator.uploads)) == (1, 1, 1)


async def test_a_timetable_change_reaches_the_put_in_flight(tmp_path: Path, start: Callable[..., Any]) -> None:
    clock = Clock(8, 30)
    daemon: Running = await start(clock)
    drop(daemon.settings.model("alpha").inbox, "big.csv", csv(2_000_000))  # 20 s at 100 KB/s
    await wait_for(lambda: received(tmp_path) >= 50_000, what="the PUT to be under way")
    assert daemon.service.window.bucket.rate == 100_000
    clock.set(10, 30)  # past the slow hour: unlimited
    await wait_for(lambda: [j for j in daemon.jobs() if j.closed], timeout=5, what="the PUT to end")
    assert len(daemon.emulator.uploads) == 1


async def test_reload_applies_a_new_timetable_at_once(
    tmp_path: Path, emulator: Emulator, make_settings: Callable[..., Settings], start: Callable[..., Any]
) -> None:
    base = make_settings()
    config = tmp_path / "config.toml"

    def write(schedule: list[str]) -> None:
        model = base.model("alpha")
        config.write_text(
            f"[api]\nbase_url = {json.dumps(emulator.base_url)}\n"
            f"[ledger]\npath = {json.dumps(str(base.ledger.path))}\n"
            "[watch]\nsettle_s = 0.05\nrescan_s = 0.5\n"
            f"[upload]\nschedule = {json.dumps(schedule)}\n"
            f'[[models]]\nname = "alpha"\ninbox = {json.dumps(str(model.inbox))}\n'
            f"api_key_file = {json.dumps(str(model.api_key_file))}\n"
        )

    write(["closed"])
    daemon: Running = await start(Clock(12), Settings.from_toml(config))
    drop(daemon.settings.model("alpha").inbox, "sales.csv", csv(10_000))
    await wait_for(lambda: daemon.service._window_waiting, what="the job to wait for the window")
    assert "which no rule of [upload] schedule opens" in daemon.service.summary()

    write(["Mon-Fry closed"])
    with structlog.testing.capture_logs() as logs:
        assert daemon.service.reload() is False
    [refused] = [e for e in logs if e["event"] == "config.reload_refused"]
    assert f'{config}: upload.schedule[0]: "Mon-Fry" is not a day range' in refused["error"]
    assert not daemon.service.window.is_open

    write(["Sat-Sun closed"])  # Monday: open now
    assert daemon.service.reload() is True
    await wait_for(lambda: [j for j in daemon.jobs() if j.closed], what="the upload after the reload")
    assert len(emulator.uploads) == 1


def test_status_command_says_when_the_window_opens(tmp_path: Path) -> None:
    """Black box: `retrain-uploader status` reads the timetable from the config with the real clock."""
    import subprocess

    from ._proc import COMMAND

    now = datetime.now(ZoneInfo("UTC"))
    if now.hour == 23 and now.minute >= 58:
        pytest.skip("too close to midnight UTC: the day named below could be over when the command runs")
    today = now.strftime("%a")
    tomorrow = (now + timedelta(days=1)).strftime("%a %Y-%m-%d")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[ledger]\npath = "state/ledger.sqlite3"\n[upload]\nschedule = ["{today} closed"]\ntimezone = "UTC"\n'
        '[[models]]\nname = "alpha"\ninbox = "inbox"\napi_key_env = "NOT_NEEDED"\n'
    )
    out = subprocess.run([*COMMAND, "status", "--config", str(config)], capture_output=True, text=True, check=True)
    assert f"upload: waiting for the upload window, opens at {tomorrow} 00:00 UTC" in out.stdout.splitlines()
