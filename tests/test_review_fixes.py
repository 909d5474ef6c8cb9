"""Regression tests for the findings of the code review (one test per finding, through real parts)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from structlog.testing import capture_logs

from retrain_uploader.closer import close_job
from retrain_uploader.config import WatchSettings
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import AFTER_UPLOAD, Ledger, State
from retrain_uploader.mover import plan_moves
from retrain_uploader.watcher import Candidate, InboxWatcher, Reject

from .conftest import drop, wait_for

CSV = "id,v\n1,a\n2,b\n"


async def test_an_unknown_put_outcome_is_never_failed_by_the_attempt_limit(start_daemon, emulator: Emulator) -> None:
    emulator.inject("put", "drop", after_body=True)  # arrived, answer lost
    emulator.inject("status", "slow", delay_s=0)  # baseline
    emulator.inject("status", "http_status", status=503, times=3)  # the settling check fails 3 times
    d = await start_daemon(retry={"max_attempts": 3})
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.state in AFTER_UPLOAD  # before the fix: failed, and `retry` would have paid twice
    assert list(emulator.upload_count_by_sha().values()) == [1]


async def test_same_content_waits_for_the_job_sending_it_and_is_sent_if_that_one_fails(
    start_daemon, emulator: Emulator
) -> None:
    emulator.inject("upload_url", "slow", delay_s=0.5)  # the first job is in flight while the second is packaged
    emulator.inject("put", "http_status", status=400, body="<Error><Code>Bad</Code><Message>no</Message></Error>")
    d = await start_daemon()
    drop(d.inbox(), "a.csv", CSV)
    await wait_for(lambda: any(j.state is State.REQUESTING for j in d.jobs()), what="first job in flight")
    drop(d.inbox(), "b.csv", CSV)
    first, second = await d.closed_jobs(2)
    assert first.state is State.FAILED
    assert second.state in AFTER_UPLOAD  # not a 'duplicate' of content that was never sent
    assert [u.filename for u in emulator.uploads] == ["b.csv"]


def test_replaying_a_move_never_renames_over_a_newer_drop(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "done").mkdir(parents=True)
    with Ledger(tmp_path / "l.db") as ledger:
        job = ledger.create_job(model="m", kind="csv", name="a", sources=["a.csv"], upload_filename="a.csv")
        targets = plan_moves(inbox, ["a.csv"], "done", job_id=job.id)
        job = ledger.update(job.id, state=State.UPLOADED, moved_to=targets)
        (inbox / "done" / "a.csv").write_text("the uploaded one")  # moved before a crash; closed=0 in the ledger
        (inbox / "a.csv").write_text("a newer drop")
        close_job(ledger, job, inbox)
        assert ledger.get(job.id).closed
    assert (inbox / "done" / "a.csv").read_text() == "the uploaded one"
    assert (inbox / "a.csv").read_text() == "a newer drop"


async def test_a_failure_to_record_one_file_does_not_end_the_watch(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    seen: list[str] = []
    calls = 0

    async def on_candidate(candidate: Candidate) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(28, "No space left on device")  # the ledger's disk was full for a moment
        seen.append(candidate.upload_filename)

    async def on_reject(reject: Reject) -> None:
        raise AssertionError(reject)

    watcher = InboxWatcher("m", inbox, WatchSettings(settle_s=0.05, rescan_s=0.1), on_candidate=on_candidate,
                           on_reject=on_reject, is_taken=lambda name: name in seen)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        with capture_logs() as logs:
            drop(inbox, "a.csv", CSV)
            await wait_for(lambda: seen == ["a.csv"], what="offered again after the failure")
            drop(inbox, "b.csv", CSV)
            await wait_for(lambda: seen == ["a.csv", "b.csv"], what="the watch goes on")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["inbox.take_failed"]


async def test_reloading_while_paused_keeps_one_probe(start_daemon, emulator: Emulator, make_settings,
                                                      tmp_path: Path) -> None:
    emulator.set_key_state("key-alpha-0001", "inactive")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[api]\nbase_url = "{emulator.base_url}"\n[ledger]\npath = "{tmp_path / "l" / "l.db"}"\n'
        "[retry]\npaused_retry_s = 0.2\nbase_delay_s = 0.01\nmax_delay_s = 0.05\n[watch]\nsettle_s = 0.05\n"
        f'[[models]]\nname = "alpha"\ninbox = "{tmp_path / "ia"}"\napi_key_file = "{tmp_path / "keys" / "alpha"}"\n'
    )
    from retrain_uploader.config import Settings

    d = await start_daemon(Settings.from_toml(config))
    drop(d.inbox(), "a.csv", CSV)
    await wait_for(lambda: d.service.models["alpha"].paused_reason, what="paused")
    for _ in range(5):
        assert d.service.reload()
    probes = lambda: sum(1 for r in emulator.requests if r.endpoint == "status")  # noqa: E731
    before, started = probes(), time.monotonic()
    await wait_for(lambda: time.monotonic() - started > 1.0, what="a second of probing")
    rate = (probes() - before) / (time.monotonic() - started)
    assert rate <= 1 / 0.2 + 2  # one probe chain (5 a second); before the fix: 6 chains


def _config(tmp_path: Path, base_url: str, models: str, extra: str = "") -> Path:
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "alpha").write_text("key-alpha-0001")
    (keys / "beta").write_text("key-beta-0002")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[api]\nbase_url = "{base_url}"\n[ledger]\npath = "{tmp_path / "l" / "l.db"}"\n'
        "[retry]\npaused_retry_s = 3600\nbase_delay_s = 0.01\nmax_delay_s = 0.05\n[watch]\nsettle_s = 0.05\n"
        f"[status]\npoll_s = 0.1\n{extra}{models}"
    )
    return path


def _model(tmp_path: Path, name: str, inbox: Path | None = None) -> str:
    inbox = inbox or tmp_path / f"in-{name}"
    return f'[[models]]\nname = "{name}"\ninbox = "{inbox}"\napi_key_file = "{tmp_path / "keys" / name}"\n'


async def test_the_tracker_does_not_spin_while_a_model_is_paused(start_daemon, emulator: Emulator,
                                                                tmp_path: Path) -> None:
    from retrain_uploader.config import Settings

    emulator.fail_retraining("key-alpha-0001", status="queued_for_gpu", message="no slot")  # stays in progress
    d = await start_daemon(Settings.from_toml(_config(tmp_path, emulator.base_url, _model(tmp_path, "alpha"))))
    drop(d.inbox(), "a.csv", CSV)
    await wait_for(lambda: any(j.retrain_status == "queued_for_gpu" for j in d.jobs()), what="retraining, polled")
    emulator.set_key_state("key-alpha-0001", "inactive")
    await wait_for(lambda: d.service.models["alpha"].paused_reason, what="paused by the tracker's status check")
    ledger = d.service.ledger
    calls = 0
    real = ledger.tracked

    def counting(**kwargs):  # a spy on the real method: it still queries the real ledger
        nonlocal calls
        calls += 1
        return real(**kwargs)

    ledger.tracked = counting  # type: ignore[method-assign]
    started = time.monotonic()
    await wait_for(lambda: time.monotonic() - started > 1.0, what="a second while paused")
    assert calls <= 30  # about one per poll_s (0.1 s); before the fix: thousands (a busy loop)


async def test_a_job_waiting_for_parked_same_content_is_parked_too_and_not_zipped_again(
    start_daemon, emulator: Emulator, tmp_path: Path
) -> None:
    from retrain_uploader.config import Settings

    emulator.set_key_state("key-alpha-0001", "inactive")
    d = await start_daemon(Settings.from_toml(_config(tmp_path, emulator.base_url, _model(tmp_path, "alpha"))))
    drop(d.inbox(), "a.csv", CSV)
    await wait_for(lambda: d.service.models["alpha"].paused_reason, what="paused")
    drop(d.inbox(), "b.csv", CSV)
    await wait_for(lambda: len(d.service.models["alpha"].parked) == 2, what="both jobs parked")
    emulator.set_key_state("key-alpha-0001", "active")
    assert d.service.reload()  # resumes at once (paused_retry_s is an hour)
    first, second = await d.closed_jobs(2)
    assert first.state in AFTER_UPLOAD and second.state is State.DUPLICATE
    assert [e["event"] for e in d.events(second.id)].count("packaged") == 1
    assert len(emulator.uploads) == 1


async def test_a_reload_that_failed_does_not_break_the_next_one(start_daemon, emulator: Emulator,
                                                                tmp_path: Path) -> None:
    from retrain_uploader.config import Settings

    config = _config(tmp_path, emulator.base_url, _model(tmp_path, "alpha"))
    d = await start_daemon(Settings.from_toml(config))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config.write_text(config.read_text() + _model(tmp_path, "beta", blocker / "inbox"))
    with capture_logs() as logs:
        assert d.service.reload() is False  # beta's inbox cannot be created under a file
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["config.reload_failed"]
    config.write_text(config.read_text().replace(str(blocker / "inbox"), str(tmp_path / "in-beta")))
    assert d.service.reload() is True
    drop(tmp_path / "in-beta", "b.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.model == "beta" and job.state in AFTER_UPLOAD
