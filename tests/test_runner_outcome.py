"""A PUT whose answer was lost: the one decision (``outcome.decide``) tested row by row, and the runner carrying it
out against the emulator — never a second PUT without a real status answer, never a job failed for a failed check,
never a file moved to ``done/`` that was not the one sent, never a file taken twice across a model rename."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from retrain_uploader.admin import collect, render
from retrain_uploader.client import ApiError, JobStatus, TransportError
from retrain_uploader.config import Settings
from retrain_uploader.emulator import WAITING, Emulator
from retrain_uploader.ledger import AFTER_UPLOAD, Ledger, State
from retrain_uploader.outcome import (
    Arrived,
    CheckFailed,
    Gone,
    KeyRefused,
    NotArrived,
    PauseModel,
    RemoteJobGone,
    Seen,
    Unresolved,
    decide,
    read_answer,
)

from ._proc import DaemonProcess, LedgerView, write_config
from .conftest import KEYS, drop, wait_for

# -- the decision, row by row ---------------------------------------------------------------------------------------

W = 300.0  # unknown_outcome_wait_s


@pytest.mark.parametrize(
    ("baseline", "answer", "since", "expected"),
    [
        # a real answer that moved on from the baseline: arrived, however soon
        ("waiting_for_upload", Seen("retraining"), 0.0, Arrived("retraining")),
        ("waiting_for_upload", Seen("job_finished"), 1e6, Arrived("job_finished")),
        ("waiting_for_upload", Seen("something_new"), 5.0, Arrived("something_new")),
        # unchanged: not arrived only once the wait is over
        ("waiting_for_upload", Seen("waiting_for_upload"), 0.0, Unresolved),
        ("waiting_for_upload", Seen("waiting_for_upload"), W - 0.001, Unresolved),
        ("waiting_for_upload", Seen("waiting_for_upload"), W, NotArrived("waiting_for_upload")),
        ("waiting_for_upload", Seen("waiting_for_upload"), 1e6, NotArrived("waiting_for_upload")),
        # no baseline (jobs from before this version): only a status that ended the job proves an arrival
        (None, Seen("job_finished"), 0.0, Arrived("job_finished")),
        (None, Seen("retrain_failed"), 0.0, Arrived("retrain_failed")),
        (None, Seen("waiting_for_upload"), 0.0, Unresolved),
        (None, Seen("waiting_for_upload"), W, NotArrived("waiting_for_upload")),
        # a failed check is never an answer, however often and however late
        ("waiting_for_upload", CheckFailed("HTTP 404: <html>"), 0.0, Unresolved),
        ("waiting_for_upload", CheckFailed("HTTP 503", 0.0), 1e6, Unresolved),
        (None, CheckFailed("ValueError: bug"), 1e6, Unresolved),
        # a refused key pauses the model; the job waits
        ("waiting_for_upload", KeyRefused("invalid_api_key."), 0.0, PauseModel("invalid_api_key.")),
        ("waiting_for_upload", KeyRefused("invalid_api_key."), 1e6, PauseModel("invalid_api_key.")),
        # the remote job is gone: a person decides, but not before the wait (a new job may not be listed yet)
        ("waiting_for_upload", Gone("Not found retrain job."), 0.0, Unresolved),
        ("waiting_for_upload", Gone("Not found retrain job."), W, RemoteJobGone("Not found retrain job.")),
    ],
)
def test_decide_table(baseline: str | None, answer: Any, since: float, expected: Any) -> None:
    verdict = decide(baseline=baseline, answer=answer, since_put_s=since, wait_s=W)
    if isinstance(expected, type):
        assert isinstance(verdict, expected)
    else:
        assert verdict == expected


def test_unresolved_waits_for_the_rest_of_the_wait_and_keeps_retry_after() -> None:
    unchanged = decide(baseline="w", answer=Seen("w"), since_put_s=100.0, wait_s=W)
    assert isinstance(unchanged, Unresolved) and unchanged.after_s == pytest.approx(200.0)
    failed = decide(baseline="w", answer=CheckFailed("503", retry_after=7.0), since_put_s=0.0, wait_s=W)
    assert isinstance(failed, Unresolved) and failed.after_s == 0.0 and failed.retry_after == 7.0


_statuses = st.sampled_from(["waiting_for_upload", "retraining", "job_finished", "retrain_failed", "x"])
_answers = st.one_of(
    st.builds(Seen, _statuses),
    st.builds(CheckFailed, st.text(max_size=5), st.none() | st.floats(0, 10)),
    st.builds(KeyRefused, st.text(max_size=5)),
    st.builds(Gone, st.text(max_size=5)),
)


@given(
    baseline=st.none() | _statuses,
    answer=_answers,
    since=st.floats(-10, 1e7, allow_nan=False),
    wait=st.floats(0, 1e4, allow_nan=False),
)
def test_decide_never_sends_again_without_a_real_unchanged_answer_after_the_wait(
    baseline: str | None, answer: Any, since: float, wait: float
) -> None:
    verdict = decide(baseline=baseline, answer=answer, since_put_s=since, wait_s=wait)
    if isinstance(verdict, NotArrived):
        assert isinstance(answer, Seen) and max(since, 0.0) >= wait  # a negative time counts as none
        assert baseline is None or answer.status == baseline
    if isinstance(verdict, Arrived):
        assert isinstance(answer, Seen) and answer.status != baseline
    if isinstance(answer, CheckFailed):
        assert isinstance(verdict, Unresolved)
    if isinstance(verdict, Unresolved):
        assert verdict.after_s >= 0


@pytest.mark.parametrize(
    ("result", "kind"),
    [
        (JobStatus("retraining"), Seen),
        (ApiError("status", 400, code=4001000204, error="PREDA_EXTERNAL_BAD_REQUEST", message="Not found retrain job."),
         Gone),
        (ApiError("status", 400, code=4001000204, error="PREDA_EXTERNAL_BAD_REQUEST",
                  message="This job may be deleted."), Gone),
        (ApiError("status", 400, code=4001000204, error="PREDA_EXTERNAL_BAD_REQUEST", message="invalid_api_key."),
         KeyRefused),
        # a gateway's HTML 404 that happens to contain the words is not the documented answer
        (ApiError("status", 404, message="Not found retrain job."), CheckFailed),
        (ApiError("status", 404, message="<html><body>404 Not Found</body></html>"), CheckFailed),
        (ApiError("status", 418, code=4181000000, error="TEAPOT", message="odd"), CheckFailed),
        (ApiError("status", 503, message="busy", retry_after=0.0), CheckFailed),
        (ApiError("status", 200, message="the body is not the expected JSON"), CheckFailed),
        (TransportError("status", "connection reset"), CheckFailed),
        (ValueError("a bug of ours"), CheckFailed),
        (KeyError("status"), CheckFailed),
    ],
)
def test_read_answer(result: Any, kind: type) -> None:
    assert isinstance(read_answer(result), kind)


# -- the runner against the emulator ----------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _table(seed: int, rows: int = 5) -> bytes:
    return ("id,x\n" + "".join(f"{seed}-{i},{i * seed}\n" for i in range(rows))).encode()


def _done_files_were_received(inbox: Path, emulator: Emulator) -> None:
    received = {u.sha256 for u in emulator.uploads}
    for path in (inbox / "done").iterdir():
        if path.name.endswith((".csv", ".zip")) and ".result." not in path.name:
            assert _sha(path.read_bytes()) in received, f"{path.name} is in done/ but was never received"


async def test_failed_and_odd_status_answers_after_a_lost_put_never_fail_the_job_or_send_again(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    emulator.inject("put", "drop", after_body=True)  # arrived, answer lost
    emulator.inject("status", "slow", delay_s=0)  # the baseline is recorded
    # then: a gateway's HTML 404, 503s that say "retry at once", a 200 that is not JSON, a 418 of unknown shape
    emulator.inject("status", "http_status", status=404, body="<html><h1>404 Not Found</h1></html>",
                    content_type="text/html")
    emulator.inject("status", "http_status", status=503, retry_after=0, times=6)
    emulator.inject("status", "malformed")
    emulator.inject("status", "http_status", status=418, body="{}", content_type="application/json")
    with capture_logs() as logs:
        d = await start_daemon()
        drop(d.inbox(), "a.csv", _table(14))
        [job] = await d.closed_jobs(1)
    assert job.state in AFTER_UPLOAD  # not failed: a failed job plus `retry` would pay twice
    assert list(emulator.upload_count_by_sha().values()) == [1]
    assert [r.endpoint for r in emulator.requests].count("put") == 1
    unknown = [e for e in logs if e["event"] == "upload.outcome_unknown"]
    assert [e["attempt"] for e in unknown] == list(range(1, 10))
    assert [e for e in logs if e["event"] == "job.failed"] == []
    uploaded = [e["detail"] for e in d.events(job.id) if e["event"] == "uploaded"]
    assert uploaded == [{"confirmed_by_status": True}]


async def test_a_status_that_changes_late_is_not_read_as_not_arrived_before_the_wait(
    tmp_path: Path, make_settings: Callable[..., Settings], start_daemon: Callable[..., Any]
) -> None:
    # The real service may show the upload some time after the object lands: here 1.5 s after.
    store = tmp_path / "lagging-store"
    store.mkdir()
    async with Emulator(keys=KEYS, store_dir=store, status_lag_s=1.5) as emulator:
        emulator.inject("put", "drop", after_body=True)
        settings = make_settings(
            api={"base_url": emulator.base_url},
            retry={"unknown_outcome_wait_s": 4.0, "base_delay_s": 0.05, "max_delay_s": 0.1},
        )
        with capture_logs() as logs:
            d = await start_daemon(settings)
            drop(d.inbox(), "a.csv", _table(3))
            [job] = await d.closed_jobs(1, timeout=20)
            await d.stop()
    assert job.state in AFTER_UPLOAD
    assert list(emulator.upload_count_by_sha().values()) == [1]
    unknown = [e for e in logs if e["event"] == "upload.outcome_unknown"]
    assert unknown and all("unchanged so far" in e["error"] for e in unknown)
    assert [e for e in logs if e["event"] == "upload.not_arrived"] == []


async def test_an_unchanged_status_after_the_wait_sends_the_file_again_once(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    emulator.inject("put", "drop", after_body=False)  # the body never arrived; the connection died at its end
    with capture_logs() as logs:
        d = await start_daemon(retry={"unknown_outcome_wait_s": 0.3})
        drop(d.inbox(), "a.csv", _table(5))
        [job] = await d.closed_jobs(1)
    assert job.state in AFTER_UPLOAD
    assert list(emulator.upload_count_by_sha().values()) == [1]
    assert [r.endpoint for r in emulator.requests].count("put") == 2
    # The client cannot tell whether its last byte made it: this case is settled by the status check.
    [not_arrived] = [e for e in logs if e["event"] == "upload.not_arrived"]
    assert not_arrived["status"] == WAITING


async def test_a_5xx_after_the_whole_body_is_settled_by_the_status_check_not_sent_again(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    # A gateway in front of the storage answers 502 although the storage kept the object.
    emulator.inject("put", "http_status", status=502, after_body=True)
    d = await start_daemon(retry={"unknown_outcome_wait_s": 2.0})
    drop(d.inbox(), "a.csv", _table(9))
    [job] = await d.closed_jobs(1)
    assert job.state in AFTER_UPLOAD
    assert list(emulator.upload_count_by_sha().values()) == [1]
    assert [r.endpoint for r in emulator.requests].count("put") == 1
    assert [e["detail"] for e in d.events(job.id) if e["event"] == "uploaded"] == [{"confirmed_by_status": True}]


async def test_a_gateway_page_on_the_status_check_before_the_put_does_not_fail_a_good_file(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    page = {"status": 404, "body": "<html><h1>404 Not Found</h1></html>", "content_type": "text/html"}
    emulator.inject("status", "http_status", times=3, **page)  # the baseline, asked and asked again
    d = await start_daemon()
    drop(d.inbox(), "a.csv", _table(10))
    [job] = await d.closed_jobs(1)
    assert job.state in AFTER_UPLOAD, job.error
    assert list(emulator.upload_count_by_sha().values()) == [1]


async def test_the_job_says_its_outcome_is_unknown_while_it_is(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    emulator.inject("put", "drop", after_body=True)
    emulator.inject("status", "slow", delay_s=0)
    emulator.inject("status", "http_status", status=503, times=1000)
    d = await start_daemon()
    drop(d.inbox(), "a.csv", _table(6))

    def unresolved() -> Any:
        jobs = d.jobs()
        return jobs and jobs[0].outcome_unknown_since is not None and jobs[0]

    job = await wait_for(unresolved, what="a job whose PUT outcome is unknown")
    assert job.state is State.UPLOADING and job.as_dict()["outcome_unknown_since"] == job.outcome_unknown_since
    with Ledger(d.settings.ledger.path) as ledger:
        report = collect(d.settings, ledger)
    [alpha] = [m for m in report["models"] if m["model"] == "alpha"]
    assert [(u["id"], u["file"]) for u in alpha["outcome_unknown"]] == [(job.id, "a.csv")]
    assert f"UPLOAD OUTCOME UNKNOWN: job {job.id} 'a.csv'" in render(report)
    # Attempts are not spent on it: many failed checks later it is still waiting, not failed.
    await wait_for(lambda: sum(r.endpoint == "status" for r in emulator.requests) > 12, what="many failed checks")
    [job] = d.jobs()
    assert job.state is State.UPLOADING and not job.closed
    emulator.clear_faults()
    [job] = await d.closed_jobs(1)
    assert job.state in AFTER_UPLOAD and job.outcome_unknown_since is None
    assert list(emulator.upload_count_by_sha().values()) == [1]


# -- only the files that were sent are moved ----------------------------------------------------------------------


async def test_a_file_dropped_again_under_the_same_name_during_the_upload_is_not_moved_unsent(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    old, new = _table(21), _table(22, rows=9)
    emulator.inject("put", "drop", after_body=True)  # the body is received whole; the answer is lost
    emulator.inject("status", "slow", delay_s=0)  # baseline
    emulator.inject("status", "slow", delay_s=1.0)  # the settling check takes a moment: the user drops again
    with capture_logs() as logs:
        d = await start_daemon()
        inbox = d.inbox()
        drop(inbox, "a.csv", old)
        await wait_for(lambda: emulator.uploads, what="the first upload received")
        drop(inbox, "a.csv", new)  # a corrected file, renamed over the one being uploaded
        jobs = await d.closed_jobs(2, timeout=20)
    assert [j.state in AFTER_UPLOAD for j in jobs] == [True, True]
    assert emulator.upload_count_by_sha() == {_sha(old): 1, _sha(new): 1}
    assert (inbox / "done" / "a.csv").read_bytes() == new  # the old bytes are gone: the user replaced them
    assert not (inbox / "a.csv").exists()
    _done_files_were_received(inbox, emulator)
    [replaced] = [e for e in logs if e["event"] == "job.source_replaced"]
    assert replaced["job_id"] == jobs[0].id and replaced["source"] == "a.csv"


async def test_a_pair_half_replaced_after_the_upload_keeps_the_new_half_in_the_inbox(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    train, evals, new_eval = _table(31), _table(32), _table(33, rows=4)
    emulator.inject("put", "drop", after_body=True)
    emulator.inject("status", "slow", delay_s=0)
    emulator.inject("status", "slow", delay_s=1.0)
    d = await start_daemon()
    inbox = d.inbox()
    drop(inbox, "p.train.csv", train)
    drop(inbox, "p.eval.csv", evals)
    await wait_for(lambda: emulator.uploads, what="the pair's upload received")
    drop(inbox, "p.eval.csv", new_eval)
    [job] = await d.closed_jobs(1, timeout=20)
    await wait_for(lambda: not (inbox / "p.train.csv").exists(), what="the train half moved")
    assert (inbox / "done" / "p.train.csv").read_bytes() == train
    assert (inbox / "p.eval.csv").read_bytes() == new_eval  # waits for a partner, not moved unsent
    assert not (inbox / "done" / "p.eval.csv").exists()
    assert [e["detail"]["replaced"] for e in d.events(job.id) if e["event"] == "closed"] == [["p.eval.csv"]]


@pytest.mark.slow
async def test_kill_9_between_upload_and_move_then_a_new_file_under_the_same_name(
    tmp_path: Path, emulator: Emulator
) -> None:
    old, new = _table(41), _table(42, rows=7)
    emulator.inject("put", "drop", after_body=True)
    emulator.inject("status", "slow", delay_s=0)
    emulator.inject("status", "hang")  # the check that would settle the lost answer never answers
    config = write_config(tmp_path, emulator.base_url)
    settings = Settings.from_toml(config)
    inbox = settings.model("alpha").inbox
    ledger = LedgerView(settings.ledger.path)
    drop(inbox, "a.csv", old)
    d = DaemonProcess(config, tmp_path)
    try:
        await d.start()

        def arrived_not_recorded() -> bool:
            jobs = ledger.jobs() if settings.ledger.path.exists() else []
            return bool(emulator.uploads) and bool(jobs) and bool(jobs[0]["put_started"])

        await wait_for(arrived_not_recorded, 15, "an upload the daemon has not recorded")
        await d.kill()
        drop(inbox, "a.csv", new)  # while the daemon is down
        await d.start()
        jobs = await ledger.all_closed(2)
        assert [j["state"] in {str(s) for s in AFTER_UPLOAD} for j in jobs] == [True, True]
        assert emulator.upload_count_by_sha() == {_sha(old): 1, _sha(new): 1}
        assert (inbox / "done" / "a.csv").read_bytes() == new
        _done_files_were_received(inbox, emulator)
        assert [r["job_id"] for r in d.logged("job.source_replaced")] == [jobs[0]["id"]]
    finally:
        await d.close()


# -- a renamed model ------------------------------------------------------------------------------------------------


async def test_renaming_a_model_during_an_upload_does_not_take_its_file_again(
    tmp_path: Path, emulator: Emulator
) -> None:
    emulator.inject("put", "slow", delay_s=1.5)  # the upload is under way while the config is reloaded
    config = write_config(tmp_path, emulator.base_url, retry={"unknown_outcome_wait_s": 0.2})
    settings = Settings.from_toml(config)
    inbox = settings.model("alpha").inbox
    drop(inbox, "a.csv", _table(51))
    d = DaemonProcess(config, tmp_path)
    try:
        await d.start()
        await wait_for(lambda: any(r.endpoint == "put" for r in emulator.requests), what="the PUT under way")
        text = config.read_text().replace('name = "alpha"', 'name = "alpha-renamed"')
        assert "alpha-renamed" in text
        config.write_text(text)
        os.kill(d.pid, 1)  # SIGHUP
        await wait_for(lambda: d.logged("config.reloaded"), what="the reload")
        ledger = LedgerView(settings.ledger.path)
        await ledger.all_closed(1)
        # The renamed model's watcher scanned the inbox at once, while a.csv was still being sent: not taken again.
        drop(inbox, "b.csv", _table(51))  # the same content again, now under the new name: a duplicate
        jobs = await ledger.all_closed(2)
        assert len(jobs) == 2
        assert jobs[1]["model"] == "alpha-renamed" and jobs[1]["state"] == "duplicate"
        assert list(emulator.upload_count_by_sha().values()) == [1]
        assert [r.endpoint for r in emulator.requests].count("upload_url") == 1
    finally:
        await d.close()


async def test_a_restart_after_a_rename_resumes_the_old_model_s_job_under_the_new_name(
    tmp_path: Path, emulator: Emulator
) -> None:
    emulator.inject("put", "drop", after_body=True)
    emulator.inject("status", "slow", delay_s=0)
    emulator.inject("status", "hang")
    config = write_config(tmp_path, emulator.base_url)
    settings = Settings.from_toml(config)
    inbox = settings.model("alpha").inbox
    ledger = LedgerView(settings.ledger.path)
    drop(inbox, "a.csv", _table(61))
    d = DaemonProcess(config, tmp_path)
    try:
        await d.start()
        await wait_for(lambda: emulator.uploads and ledger.jobs() and ledger.jobs()[0]["put_started"],
                       what="an upload whose answer was lost")
        await d.kill()
        config.write_text(config.read_text().replace('name = "alpha"', 'name = "renamed"'))
        await d.start()
        [job] = await ledger.all_closed(1)
        assert job["model"] == "alpha" and job["state"] in {str(s) for s in AFTER_UPLOAD}
        assert [r["was"] for r in d.logged("job.model_renamed")] == ["alpha"]
        assert list(emulator.upload_count_by_sha().values()) == [1]
        assert (inbox / "done" / "a.csv").exists()
    finally:
        await d.close()


async def test_a_file_dropped_over_a_held_name_becomes_a_job_as_soon_as_the_first_closes(
    start_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    """Its own event came while the name was held (the scan passed it over), and the close leaves it alone: the
    release of the name wakes a scan, so it does not wait for the periodic rescan (30 s here). Found by review."""
    old, new = _table(41), _table(42, rows=6)
    emulator.inject("put", "slow", delay_s=1.0)
    d = await start_daemon(watch={"settle_s": 0.05, "rescan_s": 30})
    inbox = d.inbox()
    drop(inbox, "a.csv", old)
    await wait_for(lambda: any(r.endpoint == "put" for r in emulator.requests), what="the first PUT under way")
    drop(inbox, "a.csv", new)  # a corrected file, renamed over the held name while the PUT runs
    await d.closed_jobs(1, timeout=20)
    jobs = await d.closed_jobs(2, timeout=10)  # well before the 30 s rescan
    assert emulator.upload_count_by_sha() == {_sha(old): 1, _sha(new): 1}
    assert [j.state in AFTER_UPLOAD for j in jobs] == [True, True]
