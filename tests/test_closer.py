"""Closing a job: a small job's sources renamed into done/ on the event loop (no thread hop), anything that may be
slow (a staging zip to delete, an error file to write, large sources) in a thread."""

from __future__ import annotations

from pathlib import Path

from retrain_uploader.closer import close_job_off_loop
from retrain_uploader.ledger import Ledger, State
from retrain_uploader.packager import source_identities

from .conftest import CountingExecutor


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
