"""Issue 5: each upload followed to its end — status polling, result download, model switch — over real sockets."""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from retrain_uploader.admin import retry_job, switch_job
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import Ledger, State
from retrain_uploader.tracker import interpret

from .conftest import KEYS, drop, wait_for

CSV = "id,age,plan\n1,34,basic\n2,51,premium\n"
NOT_FINISHED = json.dumps(
    {"code": 4001000204, "error": "PREDA_EXTERNAL_BAD_REQUEST", "message": "Retrain job is not finished."}
)


class ManualClock:
    """The emulator's clock: retraining ends when the test says so, not after a sleep."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def finish_retraining(self) -> None:
        self.now += 10_000


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def emulator(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Emulator]:
    async with Emulator(keys=KEYS, retrain_s=60, clock=clock, url_ttl_s=1e9) as emu:
        yield emu


def models(auto_switch: bool, tmp_path: Path) -> list[dict[str, object]]:
    return [
        {
            "name": "alpha",
            "inbox": str(tmp_path / "inbox" / "alpha"),
            "api_key_file": str(tmp_path / "keys" / "alpha"),
            "auto_switch": auto_switch,
        },
    ]


def job_state(d, state: State):
    return lambda: next((j for j in d.jobs() if j.state is state), None)


@pytest.mark.parametrize("auto_switch", [False, True])
async def test_upload_retraining_finished_result_and_switch(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path, auto_switch: bool
) -> None:
    d = await start_daemon(models=models(auto_switch, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    job = await wait_for(job_state(d, State.RETRAINING), what="retraining")
    assert job.retrain_status == "retraining" and job.closed
    assert (d.inbox() / "done" / "churn.csv").exists()
    clock.finish_retraining()
    final = State.SWITCHED if auto_switch else State.FINISHED
    job = await wait_for(job_state(d, final), what=str(final))
    # The download runs beside the polls (an auto-switch never waits for it): wait for it to be recorded.
    job = await wait_for(lambda: next((j for j in d.jobs() if j.result_path), None), what="result")
    assert job.model_id == 1
    assert job.result_path == "done/churn.result.zip"
    with zipfile.ZipFile(d.inbox() / job.result_path) as zf:
        assert zf.namelist()
    assert emulator.jobs[job.retrain_job_id].switched is auto_switch
    assert [u.filename for u in emulator.uploads] == ["churn.csv"]


async def test_switch_by_hand(start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path) -> None:
    d = await start_daemon(models=models(False, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    job = await wait_for(job_state(d, State.RETRAINING), what="retraining")
    with Ledger(d.settings.ledger.path) as ledger:
        with pytest.raises(ValueError, match="not finished yet"):
            await switch_job(d.settings, ledger, job.id)
        clock.finish_retraining()
        await wait_for(job_state(d, State.FINISHED), what="finished")
        message = await switch_job(d.settings, ledger, job.id)
        assert job.retrain_job_id in message
        switched = ledger.get(job.id)
    assert switched.state is State.SWITCHED and switched.switched_at
    assert emulator.jobs[job.retrain_job_id].switched


async def test_not_finished_on_auto_switch_is_retried_later(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    emulator.inject("switch", "http_status", status=400, body=NOT_FINISHED, content_type="application/json", times=2)
    d = await start_daemon(models=models(True, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    clock.finish_retraining()
    job = await wait_for(job_state(d, State.SWITCHED), what="switched")
    switch_requests = [r for r in emulator.requests if r.endpoint == "switch"]
    assert [r.status for r in switch_requests] == [400, 400, 200]
    assert job.error is None


async def test_a_failed_retraining_is_recorded_with_its_message(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    emulator.fail_retraining("key-alpha-0001", status="training_error", message="target column has one value")
    d = await start_daemon(models=models(True, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    clock.finish_retraining()
    job = await wait_for(job_state(d, State.RETRAIN_FAILED), what="retrain_failed")
    assert job.retrain_status == "training_error"
    assert job.retrain_message == job.error == "target column has one value"
    assert not any(r.endpoint == "switch" for r in emulator.requests)


async def test_a_status_never_seen_before_is_still_in_progress(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    emulator.fail_retraining("key-alpha-0001", status="queued_for_gpu", message="waiting for a slot")
    d = await start_daemon(models=models(False, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    clock.finish_retraining()
    job = await wait_for(lambda: next((j for j in d.jobs() if j.retrain_status == "queued_for_gpu"), None))
    assert job.state is State.RETRAINING
    assert job.retrain_message == "waiting for a slot"


async def test_polling_survives_a_restart(
    start_daemon, make_settings, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    settings = make_settings(models=models(False, tmp_path))
    d = await start_daemon(settings)
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    assert await d.stop() == 0
    clock.finish_retraining()
    again = await start_daemon(settings)
    job = await wait_for(job_state(again, State.FINISHED), what="finished after restart")
    assert len(emulator.uploads) == 1
    assert job.model_id == 1


async def test_give_up_after_the_configured_time(start_daemon, emulator: Emulator, tmp_path: Path) -> None:
    d = await start_daemon(models=models(False, tmp_path), status={"give_up_after_h": 0.5 / 3600})
    drop(d.inbox(), "churn.csv", CSV)
    job = await wait_for(job_state(d, State.RETRAIN_TIMEOUT), what="retrain_timeout")
    assert "after being watched for" in (job.error or "") and "retry" in (job.error or "")


async def test_one_status_request_per_job_per_interval(start_daemon, emulator: Emulator, tmp_path: Path) -> None:
    d = await start_daemon(models=models(False, tmp_path), status={"poll_s": 0.2})
    for i in range(4):
        drop(d.inbox(), f"f{i}.csv", CSV + f"{i},1,x\n")
    await wait_for(lambda: len([j for j in d.jobs() if j.state is State.RETRAINING]) == 4, what="4 retraining")
    start_count = len([r for r in emulator.requests if r.endpoint == "status"])
    started = time.monotonic()
    await wait_for(lambda: time.monotonic() - started > 1.0, what="a second of polling")
    elapsed = time.monotonic() - started
    polls = len([r for r in emulator.requests if r.endpoint == "status"]) - start_count
    # 4 jobs, one check each per 0.2 s interval: at most 4 x (elapsed / 0.2 + 1)
    assert 4 <= polls <= 4 * (elapsed / 0.2 + 1)


def test_interpret_status_values() -> None:
    assert interpret("job_finished") is State.FINISHED
    for failed in ("failed", "RETRAIN_FAILED", "error", "internal_error"):
        assert interpret(failed) is State.RETRAIN_FAILED
    for running in ("retraining", "queued", "", "新しい状態"):
        assert interpret(running) is State.RETRAINING


async def test_odd_status_answers_do_not_end_a_healthy_retraining(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    d = await start_daemon(models=models(False, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    odd = [
        ("http_status", {"status": 404, "body": "<html>Not Found</html>", "content_type": "text/html"}),
        ("http_status", {"status": 400, "body": '{"message": "Bad Request"}', "content_type": "application/json"}),
        ("http_status", {"status": 403, "body": "<html>Forbidden by the gateway</html>", "content_type": "text/html"}),
        ("malformed", {}),
        ("wrong_shape", {}),
    ]
    before = sum(r.endpoint == "status" for r in emulator.requests)
    for kind, params in odd:
        emulator.inject("status", kind, **params)
    await wait_for(lambda: sum(r.endpoint == "status" and r.status for r in emulator.requests) > before + len(odd),
                   what="every odd answer given, and one more")
    [job] = d.jobs()
    assert job.state is State.RETRAINING, job.error  # no odd answer ended it as retrain_failed
    clock.finish_retraining()
    job = await wait_for(job_state(d, State.FINISHED), what="finished")
    assert [u.filename for u in emulator.uploads] == ["churn.csv"]


async def test_the_documented_not_found_answer_ends_a_retraining(
    start_daemon, emulator: Emulator, tmp_path: Path
) -> None:
    d = await start_daemon(models=models(False, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    emulator.jobs.clear()  # deleted on the service's side: the documented "Not found retrain job."
    job = await wait_for(job_state(d, State.RETRAIN_FAILED), what="retrain_failed")
    assert "Not found retrain job." in (job.error or "")


# -- issue 15: ask before giving up; downloads beside the polls ----------------------------------------------------


async def test_a_retraining_that_finished_while_the_daemon_was_down_is_finished_not_timed_out(
    start_daemon, emulator: Emulator, clock: ManualClock, make_settings, tmp_path: Path
) -> None:
    settings = make_settings(models=models(False, tmp_path), status={"give_up_after_h": 2 / 3600})
    d = await start_daemon(settings)
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    assert await d.stop() == 0
    down = time.monotonic()
    await wait_for(lambda: time.monotonic() - down > 2.5, what="the daemon down longer than give_up_after_h")
    clock.finish_retraining()
    again = await start_daemon(settings)
    job = await wait_for(job_state(again, State.FINISHED), what="finished after the restart")
    assert job.model_id == 1 and not [j for j in again.jobs() if j.state is State.RETRAIN_TIMEOUT]


async def test_a_timed_out_retraining_can_be_followed_again_and_switched_once_it_finishes(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    d = await start_daemon(models=models(False, tmp_path), status={"give_up_after_h": 0.6 / 3600})
    drop(d.inbox(), "churn.csv", CSV)
    job = await wait_for(job_state(d, State.RETRAIN_TIMEOUT), what="retrain_timeout after being watched")
    assert job.watched_s is not None and job.watched_s >= 0.6
    clock.finish_retraining()
    with Ledger(d.settings.ledger.path) as ledger:
        [line] = retry_job(d.settings, ledger, job.id)
        assert "following the retraining" in line
    job = await wait_for(job_state(d, State.FINISHED), what="finished after retry")
    with Ledger(d.settings.ledger.path) as ledger:
        await switch_job(d.settings, ledger, job.id)
        assert ledger.get(job.id).state is State.SWITCHED


async def test_a_retrain_timeout_job_can_be_switched_when_the_api_says_it_finished(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    d = await start_daemon(models=models(False, tmp_path), status={"give_up_after_h": 0.6 / 3600})
    drop(d.inbox(), "churn.csv", CSV)
    job = await wait_for(job_state(d, State.RETRAIN_TIMEOUT), what="retrain_timeout")
    with Ledger(d.settings.ledger.path) as ledger:
        with pytest.raises(ValueError, match="not finished"):
            await switch_job(d.settings, ledger, job.id)
        clock.finish_retraining()
        await switch_job(d.settings, ledger, job.id)
        assert ledger.get(job.id).state is State.SWITCHED


async def test_a_slow_result_download_holds_up_neither_the_switch_nor_other_jobs(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    emulator.inject("result", "slow", delay_s=4)  # the first result download crawls
    d = await start_daemon(models=models(True, tmp_path))
    drop(d.inbox(), "first.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    clock.finish_retraining()
    first = await wait_for(job_state(d, State.SWITCHED), what="switched while its result is still downloading")
    assert first.result_path is None
    # The download task is started before the switch, but its request may reach the emulator after the switch did.
    await wait_for(
        lambda: any(r.endpoint == "result" and r.status is None for r in emulator.requests),
        what="the result download in flight",
    )
    drop(d.inbox(), "second.csv", CSV + "3,40,basic\n")
    await wait_for(lambda: any(j.state is State.RETRAINING for j in d.jobs()), what="the second retraining")
    clock.finish_retraining()

    def second_switched() -> bool:
        return sum(j.state is State.SWITCHED for j in d.jobs()) == 2

    await wait_for(second_switched, what="another job polled, finished and switched meanwhile")
    assert any(r.endpoint == "result" and r.status is None for r in emulator.requests)
    await wait_for(lambda: all(j.result_path for j in d.jobs()), timeout=20, what="both results downloaded")


async def test_a_result_over_max_result_bytes_is_not_downloaded(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    d = await start_daemon(models=models(False, tmp_path), status={"max_result_bytes": 10})
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    clock.finish_retraining()
    job = await wait_for(lambda: next((j for j in d.jobs() if j.result_path == ""), None), what="no result")
    assert job.state is State.FINISHED
    assert not list((d.inbox() / "done").glob("*.result.zip")) and not list((d.inbox() / "done").glob(".*part"))
    events = [e for e in d.events(job.id) if e["event"] == "result_unavailable"]
    assert "max_result_bytes" in events[0]["detail"]["error"]


async def test_a_switch_by_hand_before_the_daemon_saw_the_end_records_the_final_status(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    d = await start_daemon(models=models(False, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    job = await wait_for(job_state(d, State.RETRAINING), what="retraining")
    assert await d.stop() == 0  # nobody polls: the ledger still says retraining when the person switches
    clock.finish_retraining()
    with Ledger(d.settings.ledger.path) as ledger:
        await switch_job(d.settings, ledger, job.id)
        switched = ledger.get(job.id)
    assert switched.state is State.SWITCHED
    assert (switched.retrain_status, switched.model_id) == ("job_finished", 1)


async def test_a_model_removed_from_the_config_leaves_its_retraining_untracked_until_it_comes_back(
    start_daemon, make_settings, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    from structlog.testing import capture_logs

    with_alpha = make_settings(models=models(False, tmp_path))
    d = await start_daemon(with_alpha)
    drop(d.inbox(), "churn.csv", CSV)
    job = await wait_for(job_state(d, State.RETRAINING), what="retraining")
    assert await d.stop() == 0
    keys = tmp_path / "keys"
    beta_only = make_settings(
        models=[{"name": "beta", "inbox": str(tmp_path / "inbox" / "beta"), "api_key_file": str(keys / "beta")}]
    )
    with capture_logs() as logs:
        without = await start_daemon(beta_only)
        assert await without.stop() == 0
    [untracked] = [e for e in logs if e["event"] == "job.untracked"]
    assert untracked["job_id"] == job.id and "no longer in the config" in untracked["reason"]
    clock.finish_retraining()
    back = await start_daemon(with_alpha)
    await wait_for(job_state(back, State.FINISHED), what="followed again once the model is back")


async def test_two_results_of_one_name_downloaded_together_each_keep_their_own(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    # Found by review: both downloads picked done/churn.result.zip (and its one part file): job 1's path held job 2's
    # result, and job 1's own was lost.
    emulator.inject("result", "slow", delay_s=0.5, times=2)  # both downloads under way at once
    d = await start_daemon(models=models(False, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="the first retraining")
    drop(d.inbox(), "churn.csv", CSV + "3,40,basic\n")
    await wait_for(lambda: sum(j.state is State.RETRAINING for j in d.jobs()) == 2, what="both retraining")
    clock.finish_retraining()
    jobs = await wait_for(lambda: (js := d.jobs()) and all(j.result_path for j in js) and js, what="both results")
    assert len({j.result_path for j in jobs}) == 2
    for job in jobs:
        with zipfile.ZipFile(d.inbox() / job.result_path) as zf:
            assert job.retrain_job_id in zf.read("result.csv").decode()
    assert [p.name for p in (d.inbox() / "done").iterdir() if p.name.endswith(".part")] == []


async def test_a_result_that_cannot_be_placed_is_given_up_after_max_attempts(
    start_daemon, emulator: Emulator, clock: ManualClock, tmp_path: Path
) -> None:
    # Found by review: done/ made unusable failed before the download's error handling: a traceback at every poll,
    # forever, and max_attempts never counted.
    d = await start_daemon(models=models(False, tmp_path))
    drop(d.inbox(), "churn.csv", CSV)
    await wait_for(job_state(d, State.RETRAINING), what="retraining")
    done = d.inbox() / "done"
    for entry in done.iterdir():
        entry.unlink()
    done.rmdir()
    done.write_text("in the way")
    clock.finish_retraining()
    job = await wait_for(lambda: next((j for j in d.jobs() if j.result_path == ""), None), what="the result given up")
    assert job.state is State.FINISHED
