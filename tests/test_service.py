"""End to end: the real service, a real emulator on loopback, real inbox folders and a real ledger."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import AFTER_UPLOAD, State

from .conftest import KEYS, drop, fill_disk, wait_for

SENT = AFTER_UPLOAD  # uploaded; the retraining that follows may have moved it on already
CSV = "id,age,plan\n1,34,basic\n2,51,\"premium, annual\"\n"
CSV2 = "id,age,plan\n3,22,basic\n"


def sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


async def test_single_csv_is_uploaded_recorded_and_moved_to_done(start_daemon, emulator: Emulator) -> None:
    d = await start_daemon()
    drop(d.inbox(), "churn.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.state in SENT
    assert (job.upload_filename, job.sha256, job.size_bytes) == ("churn.csv", sha(CSV), len(CSV))
    assert job.retrain_job_id in emulator.jobs
    assert job.moved_to == ("done/churn.csv",)
    assert (d.inbox() / "done" / "churn.csv").read_text() == CSV
    assert not (d.inbox() / "churn.csv").exists()
    [upload] = emulator.uploads
    assert (upload.filename, upload.sha256, upload.size, upload.job_id) == ("churn.csv", sha(CSV), len(CSV),
                                                                           job.retrain_job_id)
    assert upload.content_length_header == len(CSV)


async def test_pair_is_zipped_in_the_spec_layout(start_daemon, emulator: Emulator, tmp_path: Path) -> None:
    d = await start_daemon()
    drop(d.inbox(), "sales.train.csv", CSV)
    drop(d.inbox(), "sales.eval.csv", CSV2)
    [job] = await d.closed_jobs(1)
    assert job.state in SENT and job.upload_filename == "sales.zip"
    [upload] = emulator.uploads
    assert upload.filename == "sales.zip"
    with zipfile.ZipFile(tmp_path / "emulator-store" / f"{upload.job_id}.bin") as zf:
        assert sorted(zf.namelist()) == ["eval_src/sales.eval.csv", "train_src/sales.train.csv"]
        assert zf.read("train_src/sales.train.csv").decode() == CSV
        assert zf.read("eval_src/sales.eval.csv").decode() == CSV2
    assert sorted(n for n in os.listdir(d.inbox() / "done") if n.endswith(".csv")) == [
        "sales.eval.csv",
        "sales.train.csv",
    ]
    assert list(d.settings.staging_dir.iterdir()) == []  # the temporary zip is gone


async def test_half_a_pair_waits_for_its_partner(start_daemon, emulator: Emulator) -> None:
    with capture_logs() as logs:
        d = await start_daemon()
        drop(d.inbox(), "x.train.csv", CSV)
        await wait_for(lambda: [e for e in logs if e["event"] == "inbox.waiting_for_partner"], what="warning")
        for _ in range(3):  # more scans: still one warning, nothing uploaded
            await d.service._watchers["alpha"].scan_once()
        assert d.jobs() == [] and emulator.uploads == []
        drop(d.inbox(), "x.eval.csv", CSV2)
        [job] = await d.closed_jobs(1)
    assert job.state in SENT and job.upload_filename == "x.zip"
    assert len([e for e in logs if e["event"] == "inbox.waiting_for_partner"]) == 1


async def test_a_bad_file_goes_to_failed_with_a_reason_and_never_reaches_the_api(start_daemon,
                                                                                  emulator: Emulator) -> None:
    d = await start_daemon()
    drop(d.inbox(), "ragged.csv", "a,b,c\n1,2,3\n4,5\n")
    [job] = await d.closed_jobs(1)
    assert job.state is State.FAILED
    assert "row" in (job.error or "")
    assert (d.inbox() / "failed" / "ragged.csv").exists()
    report = json.loads((d.inbox() / "failed" / "ragged.error.json").read_text())
    assert report["job_id"] == job.id and report["error"] == job.error
    assert "drop it into the inbox again" in report["what_to_do"]
    assert emulator.requests == []


async def test_same_content_twice_is_a_duplicate_and_not_uploaded_again(start_daemon, emulator: Emulator) -> None:
    d = await start_daemon()
    drop(d.inbox(), "a.csv", CSV)
    await d.closed_jobs(1)
    drop(d.inbox(), "a.csv", CSV)
    first, second = await d.closed_jobs(2)
    assert first.state in SENT
    assert second.state is State.DUPLICATE
    assert second.moved_to == (f"done/a.job{second.id}.csv",)
    assert len(emulator.uploads) == 1
    assert f"job {first.id}" in (second.error or "")


async def test_files_present_at_start_are_picked_up(start_daemon, make_settings, emulator: Emulator) -> None:
    settings = make_settings()
    drop(settings.model("alpha").inbox, "early.csv", CSV)
    drop(settings.model("beta").inbox, "early.csv", CSV2)
    d = await start_daemon(settings)
    jobs = await d.closed_jobs(2)
    assert sorted(j.model for j in jobs) == ["alpha", "beta"]
    assert all(j.state in SENT for j in jobs)
    assert sorted(u.sha256 for u in emulator.uploads) == sorted([sha(CSV), sha(CSV2)])


@pytest.mark.parametrize("name", ["売上 予測+2026&v#1.csv", "100% data;x=1?.csv"])
async def test_odd_names_arrive_intact(start_daemon, emulator: Emulator, name: str) -> None:
    d = await start_daemon()
    drop(d.inbox(), name, CSV)
    [job] = await d.closed_jobs(1)
    assert job.state in SENT
    assert [u.filename for u in emulator.uploads] == [name]
    assert emulator.jobs[job.retrain_job_id].filename == name


async def test_server_errors_are_retried_with_backoff(start_daemon, emulator: Emulator) -> None:
    emulator.inject("upload_url", "http_status", status=503, times=2)
    emulator.inject("put", "http_status", status=500, times=1)
    d = await start_daemon()
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.state in SENT and job.attempts == 3
    assert len(emulator.uploads) == 1
    retries = [e for e in d.events(job.id) if e["event"] == "retry"]
    assert [r["detail"]["attempt"] for r in retries] == [1, 2, 3]


async def test_retry_after_is_honoured(start_daemon, emulator: Emulator) -> None:
    emulator.inject("upload_url", "http_status", status=429, retry_after=0.3)
    d = await start_daemon()
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    [retry] = [e for e in d.events(job.id) if e["event"] == "retry"]
    assert retry["detail"]["delay_s"] == 0.3
    assert job.state in SENT


async def test_bounded_attempts_end_in_failed_with_a_clear_error(start_daemon, emulator: Emulator) -> None:
    emulator.inject("upload_url", "http_status", status=502, times=100)
    d = await start_daemon(retry={"max_attempts": 3})
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.state is State.FAILED
    assert job.error is not None and job.error.startswith("gave up after 3 attempts") and "HTTP 502" in job.error
    report = json.loads((d.inbox() / "failed" / "a.error.json").read_text())
    assert f"retrain-uploader retry {job.id}" in report["what_to_do"]


async def test_an_expired_upload_url_gets_a_fresh_one(start_daemon, emulator: Emulator) -> None:
    emulator.inject("upload_url", "expire")
    d = await start_daemon()
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.state in SENT
    urls = [e["detail"] for e in d.events(job.id) if e["event"] == "upload_url"]
    assert len(urls) == 2 and urls[1]["abandoned"] == urls[0]["retrain_job_id"]
    assert [u.job_id for u in emulator.uploads] == [job.retrain_job_id] == [urls[1]["retrain_job_id"]]


async def test_a_rejected_key_pauses_only_its_model_and_resumes_when_fixed(start_daemon,
                                                                           emulator: Emulator) -> None:
    emulator.set_key_state("key-alpha-0001", "inactive")
    with capture_logs() as logs:
        d = await start_daemon()
        drop(d.inbox("alpha"), "a1.csv", CSV)
        drop(d.inbox("alpha"), "a2.csv", CSV2)
        drop(d.inbox("beta"), "b.csv", CSV)
        await wait_for(lambda: any(j.model == "beta" and j.closed for j in d.jobs()), what="beta uploaded")
        await wait_for(lambda: d.service.models["alpha"].paused_reason, what="alpha paused")
        assert (d.inbox("alpha") / "a1.csv").exists() and (d.inbox("alpha") / "a2.csv").exists()
        assert [u.filename for u in emulator.uploads] == ["b.csv"]
        paused = [e for e in logs if e["event"] == "model.paused"]
        assert len(paused) == 1 and "Inactive_credential." in paused[0]["error"]
        emulator.set_key_state("key-alpha-0001", "active")
        jobs = await d.closed_jobs(3)
    assert {j.state for j in jobs} <= SENT
    assert sorted(u.filename for u in emulator.uploads) == ["a1.csv", "a2.csv", "b.csv"]
    assert any(e["event"] == "model.resumed" for e in logs)


async def test_a_lost_put_response_is_resolved_by_the_status_check(start_daemon, emulator: Emulator) -> None:
    emulator.inject("put", "drop", after_body=True)
    d = await start_daemon()
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.state in SENT
    assert len(emulator.uploads) == 1  # the body arrived once; no second paid retraining
    assert [e["detail"] for e in d.events(job.id) if e["event"] == "uploaded"] == [{"confirmed_by_status": True}]


async def test_a_put_cut_before_its_end_is_sent_again(start_daemon, emulator: Emulator) -> None:
    emulator.inject("put", "drop", after_body=False)
    d = await start_daemon()
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.state in SENT
    assert len(emulator.uploads) == 1
    assert [e["detail"] for e in d.events(job.id) if e["event"] == "uploaded"] == [{"confirmed_by_status": False}]


async def test_non_json_and_wrong_shape_bodies_are_retried_and_recorded(start_daemon, emulator: Emulator) -> None:
    emulator.inject("upload_url", "malformed")
    emulator.inject("upload_url", "wrong_shape")
    d = await start_daemon()
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    errors = [e["detail"]["error"] for e in d.events(job.id) if e["event"] == "retry"]
    assert "not JSON" in errors[0] and "unexpected response shape" in errors[1]
    assert job.state in SENT


async def test_secrets_never_reach_logs_ledger_or_error_files(start_daemon, emulator: Emulator) -> None:
    emulator.inject("put", "http_status", status=400, body="<Error><Code>Bad</Code><Message>nope</Message></Error>")
    with capture_logs() as logs:
        d = await start_daemon()
        drop(d.inbox(), "a.csv", CSV)
        [job] = await d.closed_jobs(1)
    assert job.state is State.FAILED
    ledger_bytes = b"".join(p.read_bytes() for p in d.settings.ledger.path.parent.glob("ledger.sqlite3*"))
    error_file = (d.inbox() / "failed" / "a.error.json").read_text()
    text = json.dumps(logs, default=str) + error_file + ledger_bytes.decode("utf-8", "replace")
    for secret in [*KEYS, "X-Amz-Signature", "X-Amz-Credential"]:
        assert secret not in text
    assert "nope" in error_file  # but the reason is there


async def test_symlinks_and_fifos_are_not_followed_and_go_to_failed(start_daemon, emulator: Emulator,
                                                                    tmp_path: Path) -> None:
    outside = tmp_path / "secret.csv"
    outside.write_text(CSV)
    d = await start_daemon()
    (d.inbox() / "link.csv").symlink_to(outside)
    os.mkfifo(d.inbox() / "pipe.csv")
    jobs = await d.closed_jobs(2)
    assert {j.state for j in jobs} == {State.FAILED}
    assert (d.inbox() / "failed" / "link.csv").is_symlink()
    assert (d.inbox() / "failed" / "pipe.csv").exists()
    assert outside.read_text() == CSV
    assert emulator.requests == []
    assert any("symbolic link" in (j.error or "") for j in jobs)


async def test_a_file_still_being_written_is_not_taken(start_daemon, emulator: Emulator) -> None:
    d = await start_daemon(watch={"settle_s": 0.6})
    target = d.inbox() / "slow.csv"
    with open(target, "w") as f:
        f.write("id,v\n")
        for i in range(5):
            f.write(f"{i},x\n")
            f.flush()
            os.utime(target, (0, 0))  # a copy tool that keeps an old mtime
            await asyncio.sleep(0.2)  # the pace of a slow copy (less than settle_s between writes)
            assert d.jobs() == []
    [job] = await d.closed_jobs(1)
    assert job.sha256 == sha("id,v\n" + "".join(f"{i},x\n" for i in range(5)))


async def test_shutdown_is_clean(start_daemon) -> None:
    d = await start_daemon()
    assert await d.stop() == 0


async def test_a_file_changed_after_its_check_is_checked_again_before_any_complete_put(
    start_daemon, emulator: Emulator
) -> None:
    emulator.inject("upload_url", "slow", delay_s=0.5)
    d = await start_daemon()
    path = drop(d.inbox(), "a.csv", CSV)
    await wait_for(lambda: any(r.endpoint == "upload_url" for r in emulator.requests), what="step 1 under way")
    with open(path, "a") as f:  # the user's export tool writes again while the URL is being fetched
        f.write("9,99,basic\n")
    [job] = await d.closed_jobs(1)
    assert job.state in SENT
    assert job.sha256 == sha(CSV + "9,99,basic\n")
    assert [u.sha256 for u in emulator.uploads] == [job.sha256]  # the old bytes never completed a PUT
    assert any("changed after" in (e["detail"] or {}).get("error", "") for e in d.events(job.id))


async def test_a_file_deleted_after_its_check_fails_cleanly(start_daemon, emulator: Emulator) -> None:
    emulator.inject("upload_url", "slow", delay_s=0.5)
    d = await start_daemon()
    path = drop(d.inbox(), "gone.csv", CSV)
    await wait_for(lambda: any(r.endpoint == "upload_url" for r in emulator.requests), what="step 1 under way")
    path.unlink()
    [job] = await d.closed_jobs(1)
    assert job.state is State.FAILED
    assert "disappeared from the inbox" in (job.error or "")
    assert emulator.uploads == []
    report = json.loads((d.inbox() / "failed" / "gone.error.json").read_text())
    assert report["missing"] == ["gone.csv"]


async def test_a_burst_of_drops_is_recorded_in_a_few_commits(start_daemon, emulator: Emulator) -> None:
    """A backlog found by one scan is recorded a run of takes at a time (one commit per 32), not one commit per file:
    each commit is an fsync on the event loop."""
    d = await start_daemon(pool={"workers": 1})
    inbox = d.inbox()
    transactions: list[list[str]] = []

    def trace(sql: str) -> None:
        if sql.startswith("BEGIN"):
            transactions.append([])
        elif transactions:
            transactions[-1].append(sql)

    d.service.ledger._db.set_trace_callback(trace)  # the daemon's one connection (looked inside on purpose)
    try:
        staged = inbox.parent / "staged"
        staged.mkdir()
        for i in range(64):
            (staged / f"f{i:02}.csv").write_text(f"id,x\n{i},1\n")
        for i in range(64):
            os.rename(staged / f"f{i:02}.csv", inbox / f"f{i:02}.csv")
        await wait_for(lambda: len(d.jobs()) == 64, 15, "64 jobs recorded")
    finally:
        d.service.ledger._db.set_trace_callback(None)
    creating = [t for t in transactions if any(s.startswith("INSERT INTO jobs") for s in t)]
    assert 2 <= len(creating) <= 6, len(creating)  # 64 before: one commit per file
    await d.closed_jobs(64, timeout=30)


async def test_a_burst_the_ledger_cannot_record_is_offered_again(
    start_daemon, make_settings, emulator: Emulator, small_disk: Path
) -> None:
    """The ledger's disk full while a take is recorded: nothing is recorded, the file stays in the inbox and is taken
    again once there is room (one job, sent once)."""
    d = await start_daemon(make_settings(ledger={"path": str(small_disk / "ledger.sqlite3")}))
    filler = fill_disk(small_disk)
    with capture_logs() as logs:
        drop(d.inbox(), "a.csv", "id,x\n1,2\n")
        await wait_for(lambda: any(e["event"] == "inbox.take_failed" for e in logs), 10, "the take failing")
        assert d.jobs() == [] and (d.inbox() / "a.csv").exists()
        filler.unlink()
        [job] = await d.closed_jobs(1, timeout=20)
    assert job.state in AFTER_UPLOAD
    assert len(emulator.uploads) == 1
    assert [e["file"] for e in logs if e["event"] == "inbox.take_failed"][:1] == ["a.csv"]
