"""The watcher's guarantees, through the real service, a real emulator and real folders: what it never takes, that
its event watch stays alive, and that a rejected entry makes one job however often it is seen."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from retrain_uploader.config import ModelSettings
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import AFTER_UPLOAD, Job, State
from retrain_uploader.service import Service
from retrain_uploader.watcher import InboxWatcher, printable_name, scan

from .conftest import drop, wait_for

CSV = "id,age,plan\n1,34,basic\n2,51,\"premium, annual\"\n"


def csv(n: int) -> str:
    """Distinct content per file: the same content twice is a duplicate, not a second upload."""
    return f"{CSV}{n},40,basic\n"

# Long enough that a file taken before it passes was found by the event watch, not by the periodic rescan.
NO_RESCAN = {"settle_s": 0.05, "rescan_s": 30}


def write_bytes_name(inbox: Path, name: bytes, data: bytes) -> None:
    """A file whose name is raw bytes (not UTF-8), written the way a Windows share or an old tool leaves one."""
    fd = os.open(os.fsencode(inbox) + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def top_level(inbox: Path) -> set[bytes]:
    return set(os.listdir(os.fsencode(inbox)))


def by_name(jobs: list[Job]) -> dict[str, Job]:
    return {job.upload_filename: job for job in jobs}


def is_closed(jobs: list[Job], upload_filename: str) -> bool:
    job = by_name(jobs).get(upload_filename)
    return job is not None and job.closed


def all_utf8(logs: list[dict[str, Any]]) -> bool:
    # A log line that holds a surrogate cannot be written by a UTF-8 handler (the [logging] file one raises).
    try:
        for entry in logs:
            json.dumps(entry, default=str, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- names that are not UTF-8 -------------------------------------------------------------------------------------


def test_printable_name_escapes_only_the_bytes_that_are_not_utf8() -> None:
    assert printable_name(os.fsdecode(b"caf\xe9.csv")) == "caf\\xe9.csv"
    assert printable_name("来店予測.csv") == "来店予測.csv"


async def test_a_name_that_is_not_utf8_goes_to_failed_and_nothing_else_waits(start_daemon) -> None:
    d = await start_daemon(watch=NO_RESCAN)
    inbox = d.inbox()
    with capture_logs() as logs:
        write_bytes_name(inbox, b"caf\xe9.csv", CSV.encode())
        drop(inbox, "good.csv", csv(1))
        jobs = by_name(await d.closed_jobs(2, timeout=8))
        # The event watch died on that name (watchfiles cannot decode it) and came back: a later drop is taken
        # well before the 30 s rescan.
        drop(inbox, "later.csv", csv(2))
        jobs = by_name(await d.closed_jobs(3, timeout=8))
    assert set(jobs) == {"caf\\xe9.csv", "good.csv", "later.csv"}
    reject = jobs["caf\\xe9.csv"]
    assert (reject.kind, reject.state, reject.sources) == ("reject", State.FAILED, ("caf\\xe9.csv",))
    assert reject.moved_to == (f"failed/job{reject.id}.dropped", "failed/caf\\xe9.csv.error.json")
    assert "not valid UTF-8" in (reject.error or "")
    assert (inbox / "failed" / f"job{reject.id}.dropped").read_bytes() == CSV.encode()  # the file, by its real bytes
    error_file = json.loads((inbox / "failed" / "caf\\xe9.csv.error.json").read_text(encoding="utf-8"))
    assert error_file["missing"] == []
    assert error_file["moved_to"] == [f"failed/job{reject.id}.dropped"]
    assert jobs["good.csv"].state in AFTER_UPLOAD and jobs["later.csv"].state in AFTER_UPLOAD
    assert top_level(inbox) == {b"done", b"failed"}
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["job.failed"]  # no traceback, no dead task
    assert all_utf8(logs)


async def test_an_ignored_file_with_a_name_that_is_not_utf8_that_keeps_changing_does_not_delay_drops(
    start_daemon,
) -> None:
    # Each change of such a file ends watchfiles' watch; the watch comes back within a second, not a rescan period.
    d = await start_daemon(watch=NO_RESCAN)
    inbox = d.inbox()
    stop = asyncio.Event()

    async def writer() -> None:
        path = os.path.join(os.fsencode(inbox), b".\xff\xfe.part")
        n = 0
        while not stop.is_set():
            with open(path, "ab") as f:
                f.write(b"x" * 10)
            n += 1
            await asyncio.sleep(0.05)  # a copy tool writing: the pace of the hostile writer, not a wait for a result

    task = asyncio.create_task(writer())
    try:
        with capture_logs() as logs:
            for i in range(3):
                await asyncio.sleep(0.4)  # let the writer kill the watch a few times between drops
                drop(inbox, f"f{i}.csv", csv(10 + i))
                await d.closed_jobs(i + 1, timeout=4)  # well before the 30 s rescan
    finally:
        stop.set()
        await task
    failures = [e for e in logs if e["event"] == "inbox.watch_failed"]
    # One line a minute, not one per change, nor one each time the watch came back in between (4 lines, seen in CI).
    assert len(failures) == 1, failures


# -- done/ and failed/ ----------------------------------------------------------------------------------------------


def test_scan_never_offers_the_daemons_own_folders_whatever_they_are(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (tmp_path / "archive").mkdir()
    (inbox / "done").symlink_to(tmp_path / "archive")
    (inbox / "failed").write_text("a regular file where the folder should be")
    (inbox / "elsewhere").symlink_to(tmp_path / "archive")
    files, rejects = scan(inbox)
    assert files == {}
    assert [r.name for r in rejects] == ["elsewhere"]


async def test_done_and_failed_may_be_symlinks_to_archive_folders(
    start_daemon, make_settings, tmp_path: Path
) -> None:
    settings = make_settings()
    inbox = settings.model("alpha").inbox
    inbox.mkdir(parents=True)
    archive = tmp_path / "archive"
    for folder in ("done", "failed"):
        (archive / folder).mkdir(parents=True)
        (inbox / folder).symlink_to(archive / folder, target_is_directory=True)
    d = await start_daemon(settings)
    drop(inbox, "good.csv", CSV)
    drop(inbox, "notes.txt", "not a csv")
    jobs = by_name(await d.closed_jobs(2))
    assert set(jobs) == {"good.csv", "notes.txt"}  # no job for done/ or failed/ themselves
    assert (archive / "done" / "good.csv").read_text() == CSV
    assert (archive / "failed" / "notes.txt").read_text() == "not a csv"
    assert (inbox / "done").is_symlink() and (inbox / "failed").is_symlink()


# -- one job per rejected entry -------------------------------------------------------------------------------------


async def test_a_reject_whose_move_fails_makes_one_job_until_the_entry_changes(
    start_daemon, tmp_path: Path
) -> None:
    d = await start_daemon(watch={"settle_s": 0.02, "rescan_s": 0.05})
    inbox = d.inbox()
    (inbox / "failed").rmdir()
    (inbox / "failed").write_text("in the way")  # failed/ cannot be made: every move into it fails
    target = tmp_path / "elsewhere.csv"
    target.write_text(CSV)
    with capture_logs() as logs:
        (inbox / "link.csv").symlink_to(target)
        await wait_for(lambda: d.jobs(), what="the reject's job")
        # Many rescans (every 50 ms) and two uploads later, still one job for that link.
        for n, name in enumerate(("a.csv", "b.csv")):
            drop(inbox, name, csv(n))
            await wait_for(lambda: is_closed(d.jobs(), name), what=f"{name} taken")  # noqa: B023 -- awaited here
    rejects = [j for j in d.jobs() if j.kind == "reject"]
    assert [(j.name, j.state, j.closed) for j in rejects] == [("link.csv", State.FAILED, False)]
    # Its close is tried again by the pool: one line each time, always that one job, never a traceback.
    failures = [e for e in logs if e["event"] == "job.close_failed"]
    assert failures and {e["job_id"] for e in failures} == {rejects[0].id}
    assert [e for e in logs if e["event"] in ("job.crashed", "inbox.take_failed")] == []
    assert (inbox / "link.csv").is_symlink()  # nothing lost: still where the user put it
    # A changed entry (a new link) is a new reject; with failed/ back both close, the new link moved out (the first
    # job, closed again by the pool, does not take the new link for its own).
    (inbox / "failed").unlink()
    (inbox / "failed").mkdir()
    (inbox / "link.csv").unlink()
    (inbox / "link.csv").symlink_to(target)
    await wait_for(lambda: len([j for j in d.jobs() if j.kind == "reject" and j.closed]) == 2, what="both closed")
    assert len([j for j in d.jobs() if j.kind == "reject"]) == 2
    assert (inbox / "failed" / "link.csv").is_symlink()
    assert not (inbox / "link.csv").exists()


# -- the event watch and the watcher task stay alive ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["removed", "renamed away"])
async def test_an_inbox_removed_and_made_again_is_watched_by_events_again(start_daemon, how: str) -> None:
    d = await start_daemon(watch=NO_RESCAN)
    inbox = d.inbox()
    drop(inbox, "first.csv", CSV)
    await d.closed_jobs(1, timeout=8)
    with capture_logs() as logs:
        if how == "removed":
            shutil.rmtree(inbox)
        else:
            inbox.rename(inbox.with_name("alpha.old"))
        # The scan the removal woke finds no inbox: only a live event watch can see what comes next.
        await wait_for(lambda: any(e["event"] == "inbox.unreadable" for e in logs), what="the removal seen")
        inbox.mkdir()
        drop(inbox, "second.csv", csv(2))
        jobs = await d.closed_jobs(2, timeout=8)  # long before the 30 s rescan
    assert [j.upload_filename for j in jobs] == ["first.csv", "second.csv"]
    assert (inbox / "done" / "second.csv").read_text() == csv(2)
    assert [j.state in AFTER_UPLOAD for j in jobs] == [True, True]


async def test_a_watcher_that_dies_is_logged_at_once_and_restarted_with_backoff(
    make_settings, emulator: Emulator
) -> None:
    crashes = 3

    class BuggyService(Service):
        def _make_watcher(self, model: ModelSettings) -> InboxWatcher:
            watcher = super()._make_watcher(model)
            if model.name != "alpha":
                return watcher
            real_scan = watcher.scan_once

            async def scan_once() -> None:
                nonlocal crashes
                if crashes:
                    crashes -= 1
                    raise RuntimeError("a bug in the scan")
                await real_scan()

            watcher.scan_once = scan_once  # type: ignore[method-assign]  # a bug is hard to cause for real
            return watcher

    settings = make_settings(watch={"settle_s": 0.05, "rescan_s": 5})
    service = BuggyService(settings, handle_signals=False)
    with capture_logs() as logs:
        task = asyncio.create_task(service.run())
        try:
            await asyncio.wait_for(service.ready.wait(), 10)
            drop(settings.model("alpha").inbox, "good.csv", CSV)
            await wait_for(
                lambda: [j for j in service.ledger.jobs() if j.closed], what="the file taken by the restarted watcher"
            )
        finally:
            service.request_stop()
            await asyncio.wait_for(task, 15)
    died = [e for e in logs if e["event"] == "watcher.died"]
    assert [(e["model"], e["error"], e["failures"], e["log_level"]) for e in died] == [
        ("alpha", "RuntimeError: a bug in the scan", n, "error") for n in (1, 2, 3)
    ]
    delays = [e["restart_in_s"] for e in died]
    base = settings.retry.base_delay_s
    assert delays == sorted(delays) and delays[0] <= base <= delays[1] and delays[2] >= 2 * base
    assert not [e for e in logs if e["event"] == "service.task_died"]
