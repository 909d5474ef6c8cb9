"""Status polling that spreads and adapts: checks spread over poll_s (no burst), their own concurrency apart from the
upload workers, an interval that grows with a job's age, and a tracker query that never walks finished rows."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from retrain_uploader.config import Settings
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import Ledger, State
from retrain_uploader.service import Service
from retrain_uploader.tracker import first_check_s, poll_interval

from ._proc import write_config
from .conftest import drop, wait_for

API = "/v1/external/retrain_jobs"


@pytest.mark.parametrize(
    ("age_s", "expected"),
    [(0, 60), (300, 60), (600, 60), (1200, 120), (3600, 360), (6000, 600), (86400, 600)],
)
def test_the_interval_is_poll_s_at_first_then_a_tenth_of_the_age_up_to_max_poll_s(
    age_s: float, expected: float
) -> None:
    assert poll_interval(age_s, poll_s=60, max_poll_s=600) == expected


def test_a_ceiling_below_poll_s_never_polls_faster_than_poll_s() -> None:
    assert poll_interval(10**6, poll_s=60, max_poll_s=30) == 60


@pytest.mark.parametrize("interval_s", [60.0, 600.0])
def test_checks_come_at_a_steady_rate_from_the_first_round_on(interval_s: float) -> None:
    """Jobs newly scheduled at evenly spread phases, then each checked every interval x U(0.9, 1.1) (the tracker's
    jitter): the first round must hand over to the second without a crowd just before ``interval_s`` and a gap after.
    Before, the first round was a flat phase x interval: up to 1.5x the steady rate before interval_s, 0.5x after."""
    jobs, rng = 20_000, random.Random(7)
    checks: list[float] = []
    for n in range(jobs):
        at = first_check_s((n * 0.6180339887) % 1.0, interval_s)
        assert 0.0 <= at <= 1.1 * interval_s
        while at < 3 * interval_s:
            checks.append(at)
            at += interval_s * rng.uniform(0.9, 1.1)
    bins = 60  # over three intervals
    width = 3 * interval_s / bins
    counts = [0] * bins
    for at in checks:
        counts[int(at / width)] += 1
    steady = jobs * width / interval_s
    assert max(counts) <= 1.1 * steady, counts
    assert min(counts) >= 0.9 * steady, counts


def test_the_first_check_is_within_the_jittered_interval_and_keeps_the_phases_order() -> None:
    offsets = [first_check_s(phase / 100, 60.0) for phase in range(100)]
    assert offsets == sorted(offsets)
    assert offsets[0] == 0.0
    assert offsets[50] == 30.0  # flat (phase x interval) up to 0.9 x interval
    assert 54.0 < offsets[99] <= 66.0


def test_the_trackers_query_reads_only_an_index_never_every_finished_row(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        for i in range(300):
            job = ledger.create_job(model="m", kind="csv", name=f"f{i}", sources=[f"f{i}.csv"],
                                    upload_filename=f"f{i}.csv")
            state = (State.SWITCHED, State.FINISHED, State.RETRAINING)[i % 3]
            ledger.update(job.id, state=state, retrain_job_id=f"r{i}", result_path=f"done/f{i}.zip", closed=True)
        statements: list[str] = []
        ledger._db.set_trace_callback(statements.append)
        for download, auto in ((True, ["m"]), (True, []), (False, ["m"]), (False, [])):
            statements.clear()
            tracked = ledger.tracked(download=download, auto_switch_models=auto)
            assert {j.state for j in tracked} == ({State.RETRAINING, State.FINISHED} if auto else {State.RETRAINING})
            ledger._db.set_trace_callback(None)
            [sql] = [s for s in statements if s.lstrip().startswith("SELECT")]
            plan = [row[3] for row in ledger._db.execute("EXPLAIN QUERY PLAN " + sql)]
            ledger._db.set_trace_callback(statements.append)
            assert not [step for step in plan if step.startswith("SCAN jobs")], plan
            assert [step for step in plan if step.startswith("SEARCH jobs USING INDEX")], plan


def test_the_full_rounds_rows_are_exactly_the_tracked_jobs_in_every_combination(tmp_path: Path) -> None:
    # The tracker's full round reads tracked_rows (a few columns), its due checks tracked (whole jobs): one rule.
    with Ledger(tmp_path / "l.db") as ledger:
        states = (State.SWITCHED, State.FINISHED, State.RETRAINING, State.UPLOADED, State.FAILED, State.DUPLICATE)
        for i in range(48):
            model = ("a", "b")[i % 2]
            job = ledger.create_job(model=model, kind="csv", name=f"f{i}", sources=[f"f{i}.csv"],
                                    upload_filename=f"f{i}.csv")
            result = f"done/f{i}.zip" if (i // 6) % 2 else None
            ledger.update(job.id, state=states[i % len(states)], retrain_job_id=f"r{i}", result_path=result,
                          uploaded_at=ledger.now(), closed=True)
        for download in (True, False):
            for auto in ([], ["a"], ["a", "b"]):
                whole = ledger.tracked(download=download, auto_switch_models=auto)
                rows = ledger.tracked_rows(download=download, auto_switch_models=auto)
                assert [(j.id, j.model, j.inbox, j.state, j.retrain_job_id, j.result_path, j.uploaded_at)
                        for j in whole] == [tuple(getattr(r, f) for f in r.__slots__) for r in rows]
                assert whole, (download, auto)


class StatusServer:
    """The Retrain Status Check on a real loopback port: each check answers "retraining" after ``latency_s`` and is
    recorded with its time and how many checks were in flight."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.checks: list[tuple[float, str]] = []  # (monotonic time, retrain job id)
        self.in_flight = 0
        self.most_in_flight = 0

    async def status(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        if not job_id.startswith("r-"):
            return web.json_response({"message": "Not found retrain job."}, status=404)
        self.checks.append((time.monotonic(), job_id))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)  # the API's answer time
        finally:
            self.in_flight -= 1
        return web.json_response({"status": "retraining", "metadata": {"retrain_job_id": job_id}})


@pytest.fixture
async def status_server() -> AsyncIterator[tuple[StatusServer, str]]:
    server = StatusServer(latency_s=0.05)
    app = web.Application()
    app.router.add_get(f"{API}/{{job_id}}", server.status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def retraining_jobs(settings: Settings, ages_s: list[float]) -> None:
    """Jobs already uploaded and retraining (closed: their files are in done/), uploaded ``ages_s`` ago."""
    settings.ledger.path.parent.mkdir(parents=True, exist_ok=True)
    with Ledger(settings.ledger.path) as ledger:
        for i, age in enumerate(ages_s):
            job = ledger.create_job(model="alpha", kind="csv", name=f"f{i}", sources=[f"f{i}.csv"],
                                    upload_filename=f"f{i}.csv")
            uploaded = (datetime.now(UTC) - timedelta(seconds=age)).isoformat().replace("+00:00", "Z")
            ledger.update(job.id, state=State.RETRAINING, retrain_job_id=f"r-{i}", retrain_status="retraining",
                          uploaded_at=uploaded, closed=True)


async def run_service(settings: Settings, until: Callable[[], bool], timeout: float) -> None:
    service = Service(settings, handle_signals=False)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        await wait_for(until, timeout=timeout, what="enough status checks")
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 15)


async def test_checks_spread_over_poll_s_with_their_own_concurrency(
    tmp_path: Path, status_server: tuple[StatusServer, str]
) -> None:
    server, base_url = status_server
    jobs = 20
    config = write_config(
        tmp_path, base_url, pool={"workers": 8},
        status={"poll_s": 1.0, "max_poll_s": 1.0, "max_concurrent_polls": 2, "download_result": False},
    )
    settings = Settings.from_toml(config)
    retraining_jobs(settings, [0.0] * jobs)
    await run_service(settings, lambda: len(server.checks) >= 2 * jobs, timeout=10)
    first = sorted(t for t, _ in server.checks)[:jobs]  # the first round: every job once
    assert len({job for _, job in server.checks[:jobs]}) == jobs
    mean_per_quarter = jobs / 4  # poll_s = 1 s
    start = first[0]
    quarters = [sum(start + q * 0.25 <= t < start + (q + 1) * 0.25 for t in first) for q in range(4)]
    assert max(quarters) <= 2 * mean_per_quarter, quarters  # before: all 20 in the first quarter
    assert first[-1] - first[0] >= 0.6  # spread over the interval, not bunched at its start
    assert server.most_in_flight <= 2  # max_concurrent_polls, not the 8 upload workers


async def test_an_old_job_is_checked_less_often_than_a_young_one(
    tmp_path: Path, status_server: tuple[StatusServer, str]
) -> None:
    server, base_url = status_server
    config = write_config(
        tmp_path, base_url,
        status={"poll_s": 0.2, "max_poll_s": 1.0, "download_result": False},
    )
    settings = Settings.from_toml(config)
    retraining_jobs(settings, [0.0, 3600.0])  # r-0 just uploaded, r-1 an hour ago

    def times(job: str) -> list[float]:
        return [t for t, j in server.checks if j == job]

    await run_service(settings, lambda: len(times("r-1")) >= 3, timeout=10)
    young, old = times("r-0"), times("r-1")
    old_gaps = [b - a for a, b in itertools.pairwise(old)]
    young_gaps = [b - a for a, b in itertools.pairwise(young)]
    assert min(old_gaps) >= 0.85  # max_poll_s (1 s) less 10 % jitter; before: every 0.2 s
    assert young_gaps and max(young_gaps) < 0.6  # still about poll_s
    assert len(young) >= 2 * len(old)


async def test_after_a_restart_old_jobs_are_spread_over_their_own_interval_not_checked_in_one_burst(
    tmp_path: Path, status_server: tuple[StatusServer, str]
) -> None:
    server, base_url = status_server
    jobs = 20
    config = write_config(
        tmp_path, base_url,
        status={"poll_s": 0.2, "max_poll_s": 1.0, "download_result": False},
    )
    settings = Settings.from_toml(config)
    retraining_jobs(settings, [3600.0] * jobs)  # every one checked once a max_poll_s (1 s) from now on

    await run_service(settings, lambda: len({job for _, job in server.checks}) == jobs, timeout=10)
    first_round = sorted(min(t for t, j in server.checks if j == job) for job in {j for _, j in server.checks})
    start = first_round[0]
    quarters = [sum(start + q * 0.25 <= t < start + (q + 1) * 0.25 for t in first_round) for q in range(4)]
    # The steady rate is 20 checks a second; before, all 20 came in the first poll_s (0.2 s): 5x that rate, and again
    # every max_poll_s after it.
    assert max(quarters) <= 2 * jobs / 4, quarters
    assert first_round[-1] - start >= 0.6


async def test_a_job_just_uploaded_is_first_checked_one_interval_later_not_at_once(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    """The first status check after an upload comes one ``poll_s`` (less its 10 % jitter) after the PUT, like every
    later one. Before, each upload was checked at once: a second status request per file on top of the baseline, which
    doubled the status traffic of a backlog's drain (and one request per job more than one per interval)."""
    d = await start_daemon(status={"poll_s": 1.0, "max_poll_s": 1.0})
    for i in range(3):
        drop(d.inbox(), f"f{i}.csv", f"id,age,plan\n1,34,basic\n2,5{i},premium\n")

    def checks(job_id: str | None) -> list[float]:
        return [r.at for r in emulator.requests if r.endpoint == "status" and r.job_id == job_id]

    def put_times() -> dict[str | None, float]:
        return {r.job_id: r.at for r in emulator.requests if r.endpoint == "put" and r.status == 200}

    # Three PUTs, each followed by its baseline before and one check after: four status requests would be two checks.
    await wait_for(lambda: len(put_times()) == 3 and all(len(checks(j)) >= 2 for j in put_times()), timeout=15,
                   what="each upload checked once after its PUT")
    for job_id, put_at in put_times().items():
        baseline, first = checks(job_id)[:2]
        assert baseline < put_at < first
        assert first - put_at >= 0.85, (job_id, first - put_at)  # at once before: ~0.01 s
