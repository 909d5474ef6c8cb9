"""A ledger that keeps growing stays fast: the counts `status` and the metrics read are kept by triggers (right through
every insert, state change and delete, and after the migration of an older ledger), the daemon's start and its
tracker rounds read no finished job, and `jobs --json` streams every job in constant memory, as it printed them
before. Real SQLite files, the CLI as a real process (bench/ledger_scale.py measures the same at a million jobs)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

from retrain_uploader.ledger import _MIGRATIONS, Ledger, State

from . import test_cli
from .conftest import drop, wait_for
from .test_cli import COMMAND, _env

config = test_cli.config  # the CLI's config file and keys (models alpha and beta), as a fixture


def _grouped(path: Path) -> dict[str, dict[str, int]]:
    """Jobs per model and state counted the slow way, over every row, by a connection of the test's own."""
    db = sqlite3.connect(path)
    out: dict[str, dict[str, int]] = {}
    for model, state, n in db.execute("SELECT model, state, COUNT(*) FROM jobs GROUP BY model, state"):
        out.setdefault(model, {})[state] = n
    db.close()
    return out


def _bulk(path: Path, count: int, *, error_bytes: int = 0) -> None:
    """``count`` closed jobs over models alpha and beta in one transaction (the schema is the Ledger's own)."""
    Ledger(path).close()
    db = sqlite3.connect(path)
    states = [State.FINISHED, State.FINISHED, State.FAILED, State.RETRAINING, State.SWITCHED]
    db.executemany(
        "INSERT INTO jobs (model, kind, name, sources, upload_filename, state, error, closed, created_at, updated_at,"
        " retrain_job_id) VALUES (?, 'csv', ?, ?, ?, ?, ?, 1, ?, ?, ?)",
        (
            (("alpha", "beta")[i % 2], f"f{i}", json.dumps([f"f{i}.csv"]), f"f{i}.csv", str(states[i % 5]),
             ("x" * error_bytes) if error_bytes else None, f"2026-11-01T00:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
             "2026-11-02T00:00:00.000Z", f"rj-{i}")
            for i in range(count)
        ),
    )
    db.commit()
    db.close()


def test_counts_follow_every_insert_state_change_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path) as ledger:
        jobs = [
            ledger.create_job(model=m, kind="csv", name=f"{m}{i}", sources=[f"{m}{i}.csv"], upload_filename="x.csv")
            for m in ("alpha", "beta") for i in range(3)
        ]
        assert ledger.counts() == {"alpha": {"queued": 3}, "beta": {"queued": 3}}
        ledger.update(jobs[0].id, state=State.PACKAGING)
        ledger.update(jobs[0].id, state=State.PACKAGING, attempts=2)  # no state change: no count moves
        ledger.update(jobs[1].id, state=State.FAILED, error="bad")
        claimed = ledger.claim_content(jobs[3].id, "beta", "c0ffee")  # its own UPDATE of the state
        assert not isinstance(claimed, tuple) and claimed.state is State.REQUESTING
        assert ledger.counts() == _grouped(path)
        assert ledger.counts()["alpha"] == {"queued": 1, "packaging": 1, "failed": 1}
    db = sqlite3.connect(path)  # a prune deletes finished rows: the counts follow
    db.execute("DELETE FROM job_events WHERE job_id IN (?, ?)", (jobs[1].id, jobs[2].id))
    db.execute("DELETE FROM jobs WHERE id IN (?, ?)", (jobs[1].id, jobs[2].id))
    db.commit()
    db.close()
    with Ledger(path) as ledger:
        assert ledger.counts() == _grouped(path) == {"alpha": {"packaging": 1}, "beta": {"requesting": 1,
                                                                                          "queued": 2}}
        assert ledger.matching() == 4 and ledger.matching(model="beta", state="queued") == 2


def test_an_older_ledger_is_migrated_with_its_counts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)  # a ledger as schema 7 left it
    for script in _MIGRATIONS[:7]:
        db.executescript(script)
    db.execute("PRAGMA user_version = 7")
    db.executemany(
        "INSERT INTO jobs (model, kind, name, sources, upload_filename, state, created_at, updated_at)"
        " VALUES (?, 'csv', 'n', '[]', 'n.csv', ?, '2026-11-01T00:00:00.000Z', '2026-11-01T00:00:00.000Z')",
        [("alpha", "finished")] * 5 + [("alpha", "failed")] * 2 + [("beta", "retraining")],
    )
    db.close()
    with Ledger(path) as ledger:
        assert ledger.counts() == {"alpha": {"finished": 5, "failed": 2}, "beta": {"retraining": 1}}
        ledger.create_job(model="beta", kind="csv", name="b", sources=["b.csv"], upload_filename="b.csv")
        assert ledger.counts() == _grouped(path)


def test_the_daemons_start_and_tracker_rounds_read_no_finished_job(tmp_path: Path) -> None:
    """Every statement the daemon runs at start (open jobs) and per round (tracked jobs, the metrics' counts) is an
    index search, never a walk over every job: what keeps them fast at a million (bench/ledger_scale.py)."""
    path = tmp_path / "ledger.sqlite3"
    _bulk(path, 200)
    with Ledger(path) as ledger:
        statements: list[str] = []
        ledger._db.set_trace_callback(statements.append)
        ledger.unfinished()
        tracked = ledger.tracked(download=True, auto_switch_models=["alpha"])
        ledger.tracked(download=True, auto_switch_models=["alpha"], ids=[j.id for j in tracked])
        ledger.counts()
        ledger._db.set_trace_callback(None)
        walks = {}
        for sql in statements:
            plan = [row[3] for row in ledger._db.execute("EXPLAIN QUERY PLAN " + sql)]
            # A scan of the partial index jobs_open reads only the open jobs (a handful), not the history.
            full = [step for step in plan if step.split()[:2] in (["SCAN", "jobs"], ["SCAN", "job_events"])
                        and "INDEX jobs_open" not in step]
            if full:
                walks[sql] = full
    assert len(statements) == 4
    assert walks == {}


def _peak_rss_kb(args: list[str]) -> tuple[int, bytes]:
    """A CLI run's peak RSS (VmHWM, read while it writes) and its output."""
    with subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()) as proc:
        peak = 0
        lock = threading.Lock()

        def read_hwm() -> None:
            nonlocal peak
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                return
            with lock:
                peak = max(peak, kb)

        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.005):
                read_hwm()

        watcher = threading.Thread(target=watch)
        watcher.start()
        chunks = []
        assert proc.stdout is not None and proc.stderr is not None
        while chunk := proc.stdout.read(1 << 16):
            chunks.append(chunk)
            read_hwm()
        err = proc.stderr.read()
        proc.wait()
        stop.set()
        watcher.join()
    assert proc.returncode == 0, err
    return peak, b"".join(chunks)


def test_jobs_json_streams_every_job_in_constant_memory(config: Path) -> None:
    """4,000 jobs of 16 KB each (64 MB if held at once): every one is printed, and the process grows no more than
    for one job."""
    _bulk(config.parent / "state" / "ledger.sqlite3", 4000, error_bytes=16_000)
    one, _ = _peak_rss_kb(["jobs", "--json", "--limit", "1", "--config", str(config)])
    every, out = _peak_rss_kb(["jobs", "--json", "--config", str(config)])
    assert out.count(b"\n") == 4000
    assert every - one < 16_000, f"peak RSS {every} kB for every job, {one} kB for one"


def test_jobs_json_prints_what_it_printed_before_oldest_first(config: Path) -> None:
    path = config.parent / "state" / "ledger.sqlite3"
    _bulk(path, 120)
    with Ledger(path) as ledger:
        every = [job.as_dict() for job in ledger.jobs()]

    def run(*args: str) -> list[dict[str, object]]:
        done = subprocess.run([*COMMAND, "jobs", "--json", *args, "--config", str(config)], capture_output=True,
                              env=_env(), check=True, timeout=30)
        return [json.loads(line) for line in done.stdout.decode().splitlines()]

    assert run() == every
    assert run("--limit", "7") == every[-7:]
    assert run("--state", "failed", "--model", "alpha") == [
        j for j in every if j["state"] == "failed" and j["model"] == "alpha"
    ]
    assert run("--since", "2026-11-01T00:01:00Z") == every[60:]


def test_the_listing_counts_what_a_filter_left_out(config: Path) -> None:
    _bulk(config.parent / "state" / "ledger.sqlite3", 600)  # 120 failed, 60 of them alpha's
    done = subprocess.run([*COMMAND, "jobs", "--state", "failed", "--model", "alpha", "--config", str(config)],
                          capture_output=True, text=True, env=_env(), check=True, timeout=30)
    header, *rows, footer = done.stdout.splitlines()
    assert header.split()[0] == "id"
    assert len(rows) == 50 and all(" failed " in row and " alpha " in row for row in rows)
    assert footer == "(10 older job(s) not shown; use --limit N or --since)"


def test_the_daemons_check_at_open_is_bounded_and_says_when_it_read_everything(tmp_path: Path) -> None:
    """A small ledger is checked whole (a damaged page is refused: tests/test_damaged_ledger.py); a check that would
    take longer than its budget stops there instead of holding the daemon's start for seconds."""
    path = tmp_path / "ledger.sqlite3"
    _bulk(path, 2000)
    with Ledger(path, lock=True) as ledger:
        assert ledger.checked_fully
    with Ledger(path, lock=True, check_budget_s=0.0) as ledger:
        assert not ledger.checked_fully
        assert ledger.counts()["alpha"]["finished"] == 400  # opened and usable all the same


def _history(path: Path, inbox: Path, count: int) -> None:
    """``count`` settled jobs of model alpha's inbox (finished, switched, failed; headers, contents, results), as a
    ledger collects them over months."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Ledger(path).close()
    db = sqlite3.connect(path)
    states = [State.FINISHED, State.SWITCHED, State.FAILED]
    db.executemany(
        "INSERT INTO jobs (model, kind, name, sources, upload_filename, state, closed, created_at, updated_at,"
        " retrain_job_id, inbox, header, content_sha256, sha256, result_path)"
        " VALUES ('alpha', 'csv', ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            (f"h{i}", json.dumps([f"h{i}.csv"]), f"h{i}.csv", str(states[i % 3]), "2026-11-01T00:00:00.000Z",
             "2026-11-02T00:00:00.000Z", f"rj-{i}", str(inbox.resolve()), json.dumps(["id", "x"]), f"c{i:060d}",
             f"c{i:060d}", f"done/h{i}.result.zip")
            for i in range(count)
        ),
    )
    db.commit()
    db.close()


async def _steps_for_one_file(tmp_path: Path, make_settings: Any, start_daemon: Any, history: int) -> int:
    """SQLite steps (in tens, per statement) the daemon's connection takes for one small file, from its drop to its
    retraining's result downloaded, on a ledger that already holds ``history`` settled jobs of the same inbox."""
    settings = make_settings(ledger={"path": str(tmp_path / "ledger.sqlite3")})
    _history(settings.ledger.path, settings.model("alpha").inbox, history)
    d = await start_daemon(settings)
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    d.service.ledger._db.set_progress_handler(tick, 10)
    try:
        drop(d.inbox(), "new.csv", "id,x\n1,2\n3,4\n")
        await wait_for(
            lambda: [j for j in d.jobs() if j.upload_filename == "new.csv" and j.result_path and j.closed],
            15,
            "the new file's result",
        )
    finally:
        d.service.ledger._db.set_progress_handler(None, 10)
        await d.stop()  # the next run watches the same inbox
    return count[0]


async def test_what_one_file_reads_of_the_ledger_does_not_grow_with_its_history(
    tmp_path: Path, make_settings: Any, start_daemon: Any
) -> None:
    # Every query on a file's way (take, claim, reference header, moves, tracker, result) reads indexes that end at
    # what it wants: found by measuring, two of them did not (the claim by (model, state): 235 us a file at 2,000
    # jobs; the reference header sorted every finished job: 0.5-1.6 s a file at a million).
    few = await _steps_for_one_file(tmp_path / "few", make_settings, start_daemon, 30)
    many = await _steps_for_one_file(tmp_path / "many", make_settings, start_daemon, 6000)
    assert many <= few * 1.5 + 5, (few, many)
