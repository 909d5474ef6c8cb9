"""Closing a job: a small job's sources renamed into done/ on the event loop (no thread hop), anything that may be
slow (a staging zip to delete, an error file to write, large sources) in a thread."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from retrain_uploader.closer import close_job, close_job_off_loop, taken_name
from retrain_uploader.ledger import Ledger, State
from retrain_uploader.packager import source_identities

from .conftest import CountingExecutor, armed, done_contents, drop


def uploaded_job(ledger: Ledger, inbox: Path, name: str, size: int) -> int:
    (inbox / name).write_bytes(b"a,b\n" + b"1,2\n" * (size // 4))
    job = ledger.create_job(model="m", kind="csv", name=name, sources=[name], upload_filename=name, inbox=str(inbox))
    ledger.update(job.id, state=State.UPLOADED, source_ids=source_identities(inbox, [name]))
    return job.id


async def test_a_small_job_is_closed_by_renames_on_the_loop(tmp_path: Path, thread_hops: CountingExecutor) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with Ledger(tmp_path / "l.db") as ledger:
        small = uploaded_job(ledger, inbox, "small.csv", 4096)
        large = uploaded_job(ledger, inbox, "large.csv", 300 << 10)
        closed = await close_job_off_loop(ledger, ledger.get(small), inbox)
        assert thread_hops.submitted == 0
        assert closed.closed and closed.moved_to == ("done/small.csv",)
        assert (inbox / "done" / "small.csv").exists() and not (inbox / "small.csv").exists()
        # large sources (a rename may still meet a bind mount, and fall back to a copy): in a thread, as before
        closed = await close_job_off_loop(ledger, ledger.get(large), inbox)
        assert thread_hops.submitted == 1
        assert closed.closed and (inbox / "done" / "large.csv").exists()


async def test_a_failed_job_writes_its_error_file_in_a_thread(tmp_path: Path, thread_hops: CountingExecutor) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with Ledger(tmp_path / "l.db") as ledger:
        job_id = uploaded_job(ledger, inbox, "bad.csv", 100)
        ledger.update(job_id, state=State.FAILED, error="bad", event="failed", detail={"hint": "fix it"})
        closed = await close_job_off_loop(ledger, ledger.get(job_id), inbox)
        assert thread_hops.submitted == 1  # an error file is written and fsync'd: not on the loop
        assert closed.closed and (inbox / "failed" / "bad.csv").exists()
        assert (inbox / "failed" / "bad.csv.error.json").exists()


# -- the instant between checking a source and moving it (the `before_renames` fixture: tests/conftest.py) --------


def test_a_file_dropped_between_the_check_and_the_move_never_reaches_done(
    tmp_path: Path, before_renames: list[Callable[[str, str, str], None]]
) -> None:
    """The stateful test caught it: the new file was renamed to done/ and moved back a moment later (a reader of done/
    saw a file that was never sent). Now the source is taken (renamed to a hidden name) before it is checked."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    newer = b"a,b\n" + b"9,9\n" * 40
    seen_in_done: list[set[bytes]] = []

    def hook(event: str, src: str, dst: str) -> None:
        if not seen_in_done and event == "os.rename" and src == str(inbox / "c.csv"):
            seen_in_done.append(set())  # disarmed before our own rename (which is audited too)
            drop(inbox, "c.csv", newer)
        elif seen_in_done:
            seen_in_done.append(done_contents(inbox))

    with Ledger(tmp_path / "l.db") as ledger:
        job_id = uploaded_job(ledger, inbox, "c.csv", 160)
        before_renames.append(hook)
        closed = close_job(ledger, ledger.get(job_id), inbox)
        before_renames.clear()
        seen_in_done.append(done_contents(inbox))
        assert len(seen_in_done) > 1, "the rename was never reached: the test did not test the window"
        assert all(newer not in seen for seen in seen_in_done), "the new file was in done/"
        assert (inbox / "c.csv").read_bytes() == newer, "the new drop is not back under its name"
        assert closed.closed and closed.moved_to == ("",)
        assert [p.name for p in inbox.iterdir() if p.name.startswith(".")] == []
        closed_event = [e for e in ledger.events(job_id) if e["event"] == "closed"][-1]
        assert closed_event["detail"]["replaced"] == ["c.csv"]


def test_a_second_drop_during_the_put_back_keeps_both_new_files(
    tmp_path: Path, before_renames: list[Callable[[str, str, str], None]]
) -> None:
    """Two drops in a row land in the instants around the take: the first is put back under a tagged name (a job of
    its own), the second keeps the name; nothing is lost, nothing reaches done/."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    second, third = b"a,b\n2,2\n", b"a,b\n3,3\n"
    drops: list[bytes] = [second, third]

    def hook(event: str, src: str, dst: str) -> None:
        take = len(drops) == 2 and event == "os.rename" and src == str(inbox / "c.csv")
        put_back = len(drops) == 1 and event == "os.link" and dst == str(inbox / "c.csv")
        if take or put_back:
            armed.clear()  # our own rename is audited too
            drop(inbox, "c.csv", drops.pop(0))
            armed.append(hook)

    with Ledger(tmp_path / "l.db") as ledger:
        job_id = uploaded_job(ledger, inbox, "c.csv", 160)
        before_renames.append(hook)
        closed = close_job(ledger, ledger.get(job_id), inbox)
        before_renames.clear()
        assert drops == [], "the hook did not reach both instants"
        assert closed.closed and closed.moved_to == ("",)
        assert done_contents(inbox) == set()
        assert (inbox / "c.csv").read_bytes() == third
        assert (inbox / "c.job1-restored.csv").read_bytes() == second


@pytest.mark.parametrize("ours", [True, False])
def test_a_crash_after_the_take_is_finished_by_closing_again(tmp_path: Path, ours: bool) -> None:
    """kill -9 between the take and the move leaves the source at the job's hidden name: closing again moves it on
    when it is the checked file, and puts it back when it is not."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with Ledger(tmp_path / "l.db") as ledger:
        job_id = uploaded_job(ledger, inbox, "c.csv", 160)
        job = ledger.update(job_id, moved_to=["done/c.csv"])
        (inbox / "done").mkdir()
        checked = (inbox / "c.csv").read_bytes()
        if not ours:
            drop(inbox, "c.csv", b"a,b\n7,7\n")
        assert job.source_ids is not None
        taken = inbox / taken_name(job_id, 0, job.source_ids["c.csv"])
        os.rename(inbox / "c.csv", taken)
        closed = close_job(ledger, job, inbox)
        assert not taken.exists()
        if ours:
            assert closed.moved_to == ("done/c.csv",) and (inbox / "done" / "c.csv").read_bytes() == checked
            assert not (inbox / "c.csv").exists()
        else:
            assert closed.moved_to == ("",) and done_contents(inbox) == set()
            assert (inbox / "c.csv").read_bytes() == b"a,b\n7,7\n"
