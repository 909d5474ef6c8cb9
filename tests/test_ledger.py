import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from retrain_uploader.ledger import SCHEMA_VERSION, Job, Ledger, LedgerLocked, StaleJob, State


def _claimed(claim: object) -> bool:
    """A claim that went through returns the job as claimed: `requesting`."""
    return isinstance(claim, Job) and claim.state is State.REQUESTING


def make_job(ledger: Ledger, name: str = "a", model: str = "m"):
    return ledger.create_job(model=model, kind="csv", name=name, sources=[f"{name}.csv"], upload_filename=f"{name}.csv")


def test_wal_full_sync_and_schema_version(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert ledger._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_commit_not_flushed_survives_a_kill_9_and_the_next_durable_one_is_flushed(tmp_path: Path) -> None:
    """``durable=False`` skips the fsync of one commit (a power cut may lose it, never a process crash): a child makes
    such a commit and is killed at once (SIGKILL, no clean close); the parent reads it. After relaxed commits (one of
    them failed), a durable one is made with synchronous=FULL again."""
    path = tmp_path / "l.db"
    with Ledger(path) as ledger:
        job = make_job(ledger)
    child = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from retrain_uploader.ledger import Ledger, State\n"
        "ledger = Ledger(Path(sys.argv[1]), lock=True)\n"
        f"ledger.update({job.id}, state=State.REQUESTING, retrain_job_id='r1', durable=False)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr.decode()
    with Ledger(path) as ledger:
        assert ledger.get(job.id).retrain_job_id == "r1"
        with pytest.raises(StaleJob):
            ledger.update(job.id, retrain_job_id="r2", expect_state=State.QUEUED, durable=False)
        assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: left so for the next relaxed one
        ledger.update(job.id, retrain_job_id="r3")
        assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert ledger.get(job.id).retrain_job_id == "r3"


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        ledger._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer than this program"):
        Ledger(tmp_path / "l.db")


def test_state_changes_are_durable_and_logged_as_events(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as ledger:
        job = make_job(ledger)
        assert job.state is State.QUEUED and not job.closed
        ledger.update(job.id, state=State.REQUESTING, retrain_job_id="r1", event="upload_url",
                      detail={"retrain_job_id": "r1"})
        ledger.update(job.id, state=State.REQUESTING, retrain_job_id="r2", event="upload_url",
                      detail={"retrain_job_id": "r2", "abandoned": "r1"})
    with Ledger(path) as again:
        job = again.get(job.id)
        assert job.state is State.REQUESTING and job.retrain_job_id == "r2"
        events = again.events(job.id)
        assert [e["event"] for e in events] == ["created", "upload_url", "upload_url"]
        assert events[-1]["detail"] == {"retrain_job_id": "r2", "abandoned": "r1"}
        assert [j.id for j in again.unfinished()] == [job.id]


def test_update_rejects_unknown_fields(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        job = make_job(ledger)
        with pytest.raises(ValueError, match="unknown job fields"):
            ledger.update(job.id, **{"state = 'x', id": 1})


def test_claim_content_detects_duplicates_per_model(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        first, second, other_model = make_job(ledger, "a"), make_job(ledger, "b"), make_job(ledger, "c", model="n")
        for j in (first, second, other_model):
            ledger.update(j.id, content_sha256="same")
        assert _claimed(ledger.claim_content(first.id, "m", "same"))
        assert ledger.get(first.id).state is State.REQUESTING
        assert ledger.claim_content(second.id, "m", "same") == (first.id, True)  # in flight: try later
        assert ledger.get(second.id).state is State.QUEUED
        ledger.update(first.id, state=State.UPLOADED)
        assert ledger.claim_content(second.id, "m", "same") == (first.id, False)  # sent: a duplicate
        assert _claimed(ledger.claim_content(other_model.id, "n", "same"))


def test_compare_and_set_update(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        job = make_job(ledger)
        ledger.update(job.id, state=State.FINISHED)
        ledger.update(job.id, state=State.SWITCHED, expect_state=State.FINISHED)  # e.g. the CLI's switch
        with pytest.raises(StaleJob):
            ledger.update(job.id, state=State.FINISHED, retrain_status="x", expect_state=State.RETRAINING)
        after = ledger.get(job.id)
        assert (after.state, after.retrain_status) == (State.SWITCHED, None)


def test_failed_content_may_be_sent_again(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        first, second = make_job(ledger, "a"), make_job(ledger, "b")
        ledger.update(first.id, content_sha256="h", state=State.FAILED)
        ledger.update(second.id, content_sha256="h")
        assert _claimed(ledger.claim_content(second.id, "m", "h"))


def test_one_daemon_per_ledger_and_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from retrain_uploader.ledger import Ledger\n"
            f"l = Ledger(Path({str(path)!r}), lock=True); print('locked', flush=True); sys.stdin.read()"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(LedgerLocked, match=f"pid {holder.pid}"):
            Ledger(path, lock=True)
        Ledger(path).close()  # readers (the CLI) are not locked out
    finally:
        holder.kill()
        holder.communicate()
    Ledger(path, lock=True).close()  # the kernel released the lock of the killed holder


def test_counts_and_model_rows(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        a = make_job(ledger, "a")
        make_job(ledger, "b")
        ledger.update(a.id, state=State.FAILED)
        assert ledger.counts() == {"m": {"failed": 1, "queued": 1}}
        ledger.set_paused("m", "invalid_api_key.")
        ledger.note_model("m", error="boom")
        row = ledger.models()["m"]
        assert row["paused_reason"] == "invalid_api_key." and row["last_error"] == "boom"
        ledger.set_paused("m", None)
        assert ledger.models()["m"]["paused_reason"] is None


def _steps(ledger: Ledger, call: Callable[[], Any]) -> tuple[int, Any]:
    """SQLite VM instructions (in hundreds) ``call`` takes on the ledger's connection, and its result: what it reads,
    independent of the machine."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    ledger._db.set_progress_handler(count, 100)
    try:
        result = call()
    finally:
        ledger._db.set_progress_handler(None, 100)
    return steps[0], result


def _claim_steps(ledger: Ledger, job_id: int, content: str) -> int:
    steps, claim = _steps(ledger, lambda: ledger.claim_content(job_id, "m", content, inbox="/inbox"))
    assert _claimed(claim)
    return steps


def test_a_claim_reads_no_more_with_thousands_of_jobs_already_sent(tmp_path: Path) -> None:
    # Each file's claim looked for the same content among the model's sent jobs by (model, state): it read every
    # retraining or finished job of the model, 235 us per file at 2,000 and growing with the ledger.
    with Ledger(tmp_path / "l.db") as ledger:
        def sent(n: int) -> None:
            with ledger.batch():
                for i in range(n):
                    job = ledger.create_job(model="m", kind="csv", name=f"s{i}", sources=[f"s{i}.csv"],
                                            upload_filename=f"s{i}.csv", inbox="/inbox")
                    ledger.update(job.id, state=State.RETRAINING, content_sha256=f"sent-{job.id}")

        def claimed() -> int:
            job = ledger.create_job(model="m", kind="csv", name="new", sources=["new.csv"],
                                    upload_filename="new.csv", inbox="/inbox")
            return _claim_steps(ledger, job.id, f"new-{job.id}")

        sent(10)
        few = claimed()
        sent(3000)
        many = claimed()
        assert many <= few + 2, (few, many)
        # and the claim still finds the same content sent before, from this inbox or (before schema 3) by model
        job = make_job(ledger, "dup")
        assert ledger.claim_content(job.id, "m", "sent-5", inbox="/inbox") == (5, False)
        ledger._db.execute("UPDATE jobs SET inbox = NULL WHERE id = 7")
        assert ledger.claim_content(job.id, "m", "sent-7", inbox="/elsewhere") == (7, False)


def test_the_reference_header_is_found_in_the_same_few_steps_however_many_jobs_finished(tmp_path: Path) -> None:
    # Read at every packaging, on the event loop. It sorted every finished job of the ledger to find the newest of an
    # inbox: 0.5-1.6 s a file at a million jobs (bench/ledger_scale.py's ledger). Migration 10's partial indexes end
    # in it.
    def steps(ledger: Ledger, model: str, inbox: str | None) -> tuple[int, Any]:
        return _steps(ledger, lambda: ledger.reference_header(model, inbox))

    with Ledger(tmp_path / "l.db") as ledger:
        def finished(n: int, inbox: str | None, header: list[str]) -> int:
            last = 0
            with ledger.batch():
                for i in range(n):
                    job = ledger.create_job(model="m", kind="csv", name=f"s{i}", sources=[f"s{i}.csv"],
                                            upload_filename=f"s{i}.csv", inbox=inbox)
                    state = (State.FINISHED, State.SWITCHED, State.FAILED)[i % 3]
                    ledger.update(job.id, state=state, header=header if state is not State.FAILED else None)
                    last = job.id if state is not State.FAILED else last
            return last

        newest = finished(10, "/inbox", ["a", "b"])
        few, found = steps(ledger, "m", "/inbox")
        assert found == (newest, ("a", "b"))
        finished(3000, "/other", ["x"])
        newest = finished(2, "/inbox", ["a", "c"])
        many, found = steps(ledger, "m", "/inbox")
        assert found == (newest, ("a", "c"))
        assert many <= few + 2, (few, many)
        # a row from before schema 3 (no inbox) still counts for its model, and the newer of the two wins
        old = finished(1, None, ["z"])
        assert steps(ledger, "m", "/inbox")[1] == (old, ("z",))
        assert steps(ledger, "m", "/nowhere")[1] == (old, ("z",))
        assert steps(ledger, "other-model", "/nowhere")[1] is None


def test_the_writes_of_one_commit_share_one_instant(tmp_path: Path) -> None:
    """An upload and the model's last success are one commit: one time, not two readings of a clock that may cross a
    millisecond between them (test_crash compared them and failed 1 run in 15). A clock that moves 1 s per reading."""
    ticks = iter(range(1_700_000_000, 1_800_000_000))
    with Ledger(tmp_path / "l.db", clock=lambda: float(next(ticks))) as ledger:
        job = make_job(ledger)
        with ledger.batch():
            at = ledger.now()
            job = ledger.update(job.id, state=State.UPLOADED, uploaded_at=at, event="uploaded")
            ledger.note_model("m", success=True)
        assert job.uploaded_at == job.updated_at == at
        assert [e["at"] for e in ledger.events(job.id)][-1] == at
        assert ledger.models()["m"]["last_success_at"] == at
        # Apart, each commit has its own time.
        later = ledger.update(job.id, attempts=1)
        assert later.updated_at > at
        assert ledger.now() > later.updated_at
