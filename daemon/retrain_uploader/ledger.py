"""The SQLite ledger: one row per job, every state change committed before the next step begins.

WAL with ``synchronous=FULL``: a commit is on disk when it returns. A few commits of a job's way are made with
``durable=False`` (``synchronous=NORMAL`` for that one commit: written, not flushed): each records a step that a restart
does again when a power cut loses it, before anything outside the ledger depends on it. The next durable commit
flushes them too (the WAL is one file, recovered as a prefix), and every commit a restart could not do without (the
``put_started`` mark before the first byte of a PUT, a move plan before its renames) is durable. A kill -9 loses none
of them: only a power cut or a kernel crash drops unflushed writes.
The daemon's one connection is used from the event loop; each statement is a short indexed write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from .clock import iso_utc

_T = TypeVar("_T")

__all__ = [
    "AFTER_UPLOAD",
    "CHECK_BUDGET_S",
    "DAMAGED_EXIT_STATUS",
    "PRUNABLE",
    "SCHEMA_VERSION",
    "Job",
    "Ledger",
    "LedgerDamaged",
    "LedgerLocked",
    "LedgerUnreadable",
    "StaleJob",
    "State",
    "TrackedRow",
    "check_whole",
    "connect_read_only",
    "connect_writer",
    "held_files",
    "is_corruption",
    "iso",
    "lock_held",
    "prune_batch",
    "reference_header",
    "reference_job_ids",
    "sent_before",
]


class State(StrEnum):
    QUEUED = "queued"
    PACKAGING = "packaging"
    REQUESTING = "requesting"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    # After the upload, the remote retraining (followed by polling the Retrain Status Check API):
    RETRAINING = "retraining"
    FINISHED = "finished"
    SWITCHED = "switched"
    RETRAIN_FAILED = "retrain_failed"
    RETRAIN_TIMEOUT = "retrain_timeout"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


AFTER_UPLOAD = frozenset(
    {State.UPLOADED, State.RETRAINING, State.FINISHED, State.SWITCHED, State.RETRAIN_FAILED, State.RETRAIN_TIMEOUT}
)
_TERMINAL = AFTER_UPLOAD | {State.FAILED, State.DUPLICATE}
# Another job with the same content in one of these states means the content was, or is being, sent. A retraining
# that failed remotely is the exception: dropping the same file again is how a user asks for another try.
_IN_FLIGHT = frozenset({State.REQUESTING, State.UPLOADING})
_SENT_OR_SENDING = tuple(sorted(_IN_FLIGHT | (AFTER_UPLOAD - {State.RETRAIN_FAILED})))


class LedgerLocked(RuntimeError):
    """Another process holds this ledger."""


class LedgerUnreadable(RuntimeError):
    """The ledger cannot be read (read-only open): missing, unreadable, or of another schema version."""


DAMAGED_EXIT_STATUS = 4  # `run`'s exit status for a damaged ledger: the systemd unit does not restart it


class LedgerDamaged(LedgerUnreadable):
    """The daemon's ledger is no database this program can use: damaged, truncated, or of a newer schema.

    Restarting cannot fix it: ``run`` exits with its own status, which the systemd unit does not restart.
    """


_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_DAMAGED_FIX = (
    "stop the daemon, move the file and its -wal/-shm aside (keep them for a look), then restore a backup or start"
    " with a new ledger (files already sent may then be sent again)"
)
_NOT_A_LEDGER_FIX = "point [ledger] path at a new file (or move this one away); it is not a retrain-uploader ledger"


@dataclass(frozen=True, slots=True)
class TrackedRow:
    """A tracked job as the tracker's full round sees it (:meth:`Ledger.tracked_rows`)."""

    id: int
    model: str
    inbox: str | None
    state: State
    retrain_job_id: str | None
    result_path: str | None
    uploaded_at: str | None


def _transient(error: sqlite3.Error) -> bool:
    """A lock held by another program: worth a restart, unlike a file that is not a ledger."""
    text = str(error).lower()
    return "locked" in text or "busy" in text


def is_corruption(error: sqlite3.Error) -> bool:
    """Whether ``error`` says the database file itself is damaged (not busy, not a bug in a statement)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _CORRUPT_CODES


def connect_read_only(path: Path) -> sqlite3.Connection:
    """``path`` opened read-only: no file is created or written beside it.

    Without a ``-wal`` file no daemon has it open, and ``immutable=1`` reads it without creating ``-wal``/``-shm``;
    with one, the daemon's ``-shm`` is shared (``mode=ro`` never writes the database).
    """
    if not path.is_file():
        raise LedgerUnreadable(f"{path}: no ledger there")
    idle = not path.with_name(path.name + "-wal").exists()
    try:
        db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro{'&immutable=1' if idle else ''}",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=5.0,
        )
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1")
    except sqlite3.Error as e:
        raise LedgerUnreadable(f"{path}: cannot read the ledger: {e}") from e
    return db


class StaleJob(LookupError):
    """A compare-and-set update found the job in another state than expected."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    model: str
    kind: str  # "csv" | "pair" | "zip"
    name: str
    sources: tuple[str, ...]  # file names in the model's inbox, as dropped
    upload_filename: str
    state: State
    sha256: str | None
    content_sha256: str | None
    size_bytes: int | None
    package_path: str | None
    retrain_job_id: str | None
    status_before_put: str | None
    put_started: bool
    attempts: int
    error: str | None
    moved_to: tuple[str, ...]
    closed: bool
    created_at: str
    updated_at: str
    uploaded_at: str | None = None
    retrain_status: str | None = None
    retrain_message: str | None = None
    model_id: int | None = None
    result_path: str | None = None
    switched_at: str | None = None
    # The inbox the job was taken from (resolved): a model renamed in the config keeps its inbox, its history and
    # its duplicates. None for jobs written before schema 3.
    inbox: str | None = None
    # Each source's identity when it was checked: {name: [device, inode, size, mtime_ns]}. Only files with this
    # identity are moved out of the inbox when the job closes; a file dropped again under the same name stays.
    source_ids: dict[str, list[int]] | None = None
    # When the daemon last learned that a PUT of this job has an unknown outcome (its answer was lost), until the
    # status check settles it.
    outcome_unknown_since: str | None = None
    # Bytes of the body sent by the PUT in flight (or the last one), as of its last progress report.
    bytes_sent: int | None = None
    header: tuple[str, ...] | None = None  # the (training) header checked at packaging; schema 5
    # Seconds this retraining has been watched with real status answers (schema 7); give_up_after_h counts these.
    watched_s: float | None = None

    def log_fields(self) -> dict[str, Any]:
        """The fields every log line about this job carries, so `jq 'select(.job_id==7 or .file=="x.csv")'` finds
        all of them."""
        return {
            "model": self.model,
            "job_id": self.id,
            "file": self.upload_filename,
            "retrain_job_id": self.retrain_job_id,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "state": str(self.state),
            "upload_filename": self.upload_filename,
            "retrain_job_id": self.retrain_job_id,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "attempts": self.attempts,
            "error": self.error,
            "sources": list(self.sources),
            "moved_to": list(self.moved_to),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "uploaded_at": self.uploaded_at,
            "retrain_status": self.retrain_status,
            "retrain_message": self.retrain_message,
            "model_id": self.model_id,
            "result_path": self.result_path,
            "switched_at": self.switched_at,
            "outcome_unknown_since": self.outcome_unknown_since,
            "bytes_sent": self.bytes_sent,
        }


# Every Job field is a column; these are fixed when the job is created (updated_at is set by update() itself).
_UPDATABLE = frozenset(f.name for f in dataclasses.fields(Job)) - {
    "id",
    "model",
    "kind",
    "name",
    "sources",
    "created_at",
    "updated_at",
}

_MIGRATIONS: tuple[str, ...] = (
    # 1: the core ledger
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        sources TEXT NOT NULL,
        upload_filename TEXT NOT NULL,
        state TEXT NOT NULL,
        sha256 TEXT,
        content_sha256 TEXT,
        size_bytes INTEGER,
        package_path TEXT,
        retrain_job_id TEXT,
        status_before_put TEXT,
        put_started INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        moved_to TEXT NOT NULL DEFAULT '[]',
        closed INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE INDEX jobs_content ON jobs(model, content_sha256);
    CREATE TABLE job_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        at TEXT NOT NULL,
        event TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX job_events_job ON job_events(job_id);
    CREATE TABLE models (
        name TEXT PRIMARY KEY,
        paused_reason TEXT,
        paused_at TEXT,
        last_success_at TEXT,
        last_error TEXT,
        last_error_at TEXT
    );
    """,
    # 2: following the retraining after the upload (status polling, result download, model switch)
    """
    ALTER TABLE jobs ADD COLUMN uploaded_at TEXT;
    ALTER TABLE jobs ADD COLUMN retrain_status TEXT;
    ALTER TABLE jobs ADD COLUMN retrain_message TEXT;
    ALTER TABLE jobs ADD COLUMN model_id INTEGER;
    ALTER TABLE jobs ADD COLUMN result_path TEXT;
    ALTER TABLE jobs ADD COLUMN switched_at TEXT;
    CREATE INDEX jobs_model_state ON jobs(model, state);
    """,
    # 3: exactly once across renames and re-drops: the inbox of each job, the identity of the files it checked, and
    # whether its last PUT's outcome is unknown
    """
    ALTER TABLE jobs ADD COLUMN inbox TEXT;
    ALTER TABLE jobs ADD COLUMN source_ids TEXT;
    ALTER TABLE jobs ADD COLUMN outcome_unknown_since TEXT;
    CREATE INDEX jobs_inbox_content ON jobs(inbox, content_sha256);
    """,
    # 4: the progress of the PUT in flight
    """
    ALTER TABLE jobs ADD COLUMN bytes_sent INTEGER;
    """,
    # 5: the header each job was checked with: a model's reference header is that of its last finished retraining
    """
    ALTER TABLE jobs ADD COLUMN header TEXT;
    """,
    # 6: the tracker's query reads only the jobs it still has work on, however many finished ones the ledger keeps
    """
    CREATE INDEX jobs_state_result ON jobs(state, result_path);
    """,
    # 7: how long a retraining was actually watched (answers received), for give_up_after_h: not the wall clock since
    # the upload, which counts a daemon that was down or a model that was paused
    """
    ALTER TABLE jobs ADD COLUMN watched_s REAL;
    """,
    # 8: retention ([ledger] keep_days) finds the settled jobs older than its cutoff without reading the others
    """
    CREATE INDEX jobs_state_updated ON jobs(state, updated_at);
    """,
    # 9: a million jobs: `status` and the metrics read the jobs per model and state from a table kept by triggers (not
    # a count over every row); the jobs still open (closed = 0, the daemon's start) and `jobs --since` are indexed
    """
    CREATE TABLE job_counts (
        model TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (model, state)
    ) WITHOUT ROWID;
    INSERT INTO job_counts (model, state, n) SELECT model, state, COUNT(*) FROM jobs GROUP BY model, state;
    CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (model, state, n) VALUES (new.model, new.state, 1)
            ON CONFLICT (model, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE model = old.model AND state = old.state;
    END;
    CREATE TRIGGER job_counts_update AFTER UPDATE OF model, state ON jobs
        WHEN old.model IS NOT new.model OR old.state IS NOT new.state BEGIN
        UPDATE job_counts SET n = n - 1 WHERE model = old.model AND state = old.state;
        INSERT INTO job_counts (model, state, n) VALUES (new.model, new.state, 1)
            ON CONFLICT (model, state) DO UPDATE SET n = n + 1;
    END;
    CREATE INDEX jobs_open ON jobs(id) WHERE closed = 0;
    CREATE INDEX jobs_created ON jobs(created_at);
    """,
    # 10: a model's reference header (its newest finished job's) read at every packaging: the newest such job of an
    # inbox (or, for rows before schema 3, of a model) found at the end of an index of only those jobs, not by sorting
    # every finished job of the ledger (0.5-1.6 s at a million jobs)
    """
    CREATE INDEX jobs_reference_inbox ON jobs(inbox, id)
        WHERE state IN ('finished', 'switched') AND header IS NOT NULL;
    CREATE INDEX jobs_reference_model ON jobs(model, id)
        WHERE inbox IS NULL AND state IN ('finished', 'switched') AND header IS NOT NULL;
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
CHECK_BUDGET_S = 1.0  # the longest the daemon's integrity check at start may take
# Found by content (jobs_inbox_content, jobs_content): `+state` keeps SQLite from taking jobs_model_state for the
# branch of jobs without an inbox, which read every sent job of the model (235 us per claim at 2,000, growing).
_DUPLICATE_OF = (
    "SELECT id, state FROM jobs WHERE (inbox = ? OR (inbox IS NULL AND model = ?))"  # noqa: S608 -- placeholders
    " AND content_sha256 = ? AND id != ?"
    f" AND +state IN ({', '.join('?' * len(_SENT_OR_SENDING))}) ORDER BY id LIMIT 1"
)


def _now_iso(clock: Callable[[], float]) -> str:
    return iso_utc(clock(), 3)


class Ledger:
    """The job ledger. ``lock=True`` (the daemon) takes an exclusive lock the kernel drops if the process dies."""

    def __init__(
        self,
        path: Path,
        *,
        lock: bool = False,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
        check_budget_s: float = CHECK_BUDGET_S,
    ) -> None:
        self.path = path
        # Whether the daemon's check at open read the whole file (False: a ledger too big for check_budget_s).
        self.checked_fully = False
        # Told of damage a write met at run time (a page the check at open did not reach): the daemon stops on it.
        self.on_damage: Callable[[LedgerDamaged], object] | None = None
        self._clock = clock
        self._stamp_of_tx: str | None = None  # the open transaction's time, once asked for (see _stamp)
        self._lock_fd: int | None = None
        self._flushing: bool | None = True  # whether commits are flushed now: synchronous=FULL (see _tx)
        self.commits = 0  # write transactions committed through this object (for the benchmarks)
        if read_only:
            # `status`, `jobs`, `status --check`: never create, migrate, lock or write (a monitoring user may only
            # be able to read the ledger; a backup may hold its write lock).
            self._db = connect_read_only(path)
            self._db.row_factory = sqlite3.Row
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version == 0:  # never migrated by a daemon: another program's database, or an empty file
                self._db.close()
                raise LedgerUnreadable(f"{path}: {_NOT_A_LEDGER_FIX}")
            if version != SCHEMA_VERSION:
                self._db.close()
                which = "older" if version < SCHEMA_VERSION else "newer"
                fix = "start the daemon once to update it" if version < SCHEMA_VERSION else "upgrade this program"
                msg = f"{path}: the ledger's schema ({version}) is {which} than this program's ({SCHEMA_VERSION})"
                msg += f"; {fix}"
                raise LedgerUnreadable(msg)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if lock:
            self._lock_fd = _take_lock(path.with_name(path.name + ".lock"))
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as e:  # a folder, say, where the ledger should be
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise LedgerDamaged(f"{path}: cannot open the ledger ({e}); {_NOT_A_LEDGER_FIX}") from e
        try:
            self._db.row_factory = sqlite3.Row
            if self._db.execute("PRAGMA page_count").fetchone()[0] == 0:
                # A new file (set before its first table; on an existing file the pragma would write its header):
                # pages freed by retention can be given back a few at a time (retention.py); an older ledger needs
                # one VACUUM for it.
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            if lock:
                # The daemon: a damaged page now is one clear error, not failures at every take.
                self._quick_check(check_budget_s)
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.close()
            if is_corruption(e):
                raise LedgerDamaged(f"{path}: the ledger is damaged ({e}); {_DAMAGED_FIX}") from e
            if lock and not _transient(e):  # another program's database (its own `jobs` table), say
                raise LedgerDamaged(f"{path}: not a usable ledger ({e}); {_NOT_A_LEDGER_FIX}") from e
            raise
        except LedgerDamaged:
            self.close()
            raise

    def _quick_check(self, budget_s: float) -> None:
        # A million jobs are 2 GB: a whole check takes seconds, and the daemon's start must not. The check stops
        # after budget_s (a ledger of some 100,000 jobs is still read whole); a damaged page it did not reach fails
        # the first query that reads it with SQLITE_CORRUPT instead.
        deadline = time.monotonic() + budget_s
        self._db.set_progress_handler(lambda: int(time.monotonic() > deadline), 20_000)
        try:
            problems = [str(row[0]) for row in self._db.execute("PRAGMA quick_check(3)")]
        except sqlite3.OperationalError as e:
            if "interrupt" not in str(e):
                raise
            return
        finally:
            self._db.set_progress_handler(None, 0)
        self.checked_fully = True
        if problems != ["ok"]:
            msg = f"{self.path}: the ledger is damaged (PRAGMA quick_check: {'; '.join(problems)}); {_DAMAGED_FIX}"
            raise LedgerDamaged(msg)

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _migrate(self) -> None:
        # Each step re-reads the version inside its write transaction: a CLI command opening the ledger while the
        # daemon creates it must not apply the same migration twice.
        while True:
            with self._tx():
                version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    msg = (
                        f"{self.path}: the ledger's schema ({version}) is newer than this program's"
                        f" ({SCHEMA_VERSION}); upgrade this program (or restore the ledger it wrote)"
                    )
                    raise LedgerDamaged(msg)
                if version == SCHEMA_VERSION:
                    return
                for statement in _split_sql(_MIGRATIONS[version]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version + 1}")

    @contextmanager
    def batch(self, *, durable: bool = True) -> Iterator[None]:
        """One transaction for every write made inside: one commit (one fsync) instead of one per call, and all of
        them or none on disk after a crash. Only for steps that do nothing outside the ledger in between (no request,
        no rename): a commit that must precede such an effect is made before ``batch`` or after it.

        ``durable=False``: not flushed to disk at its commit (see the module's docstring for when that is right)."""
        with self._tx(durable=durable):
            yield

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[None]:
        if self._db.in_transaction:  # inside batch(): its commit is this write's
            yield
            return
        try:
            if durable is not self._flushing:  # set only when it changes: a run of commits of one kind sets it once
                self._flushing = None  # unknown until the pragma has run
                self._db.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
                self._flushing = durable
            self._db.execute("BEGIN IMMEDIATE")
            self._stamp_of_tx = None
            try:
                yield
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled it back itself (a full disk, damage)
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self.commits += 1
        except sqlite3.DatabaseError as e:
            if not is_corruption(e):
                raise
            damage = LedgerDamaged(f"{self.path}: the ledger is damaged ({e}); {_DAMAGED_FIX}")
            if self.on_damage is not None:
                self.on_damage(damage)
            raise damage from e

    # -- jobs ---------------------------------------------------------------------------------------------------------
    def create_job(
        self,
        *,
        model: str,
        kind: str,
        name: str,
        sources: Sequence[str],
        upload_filename: str,
        inbox: str | None = None,
    ) -> Job:
        with self._tx():
            now = self._stamp()
            [row] = self._db.execute(
                "INSERT INTO jobs (model, kind, name, sources, upload_filename, state, created_at, updated_at, inbox)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (model, kind, name, json.dumps(list(sources)), upload_filename, State.QUEUED, now, now, inbox),
            ).fetchall()
            self._event(row["id"], "created", {"sources": list(sources)})
        return _job(row)

    def get(self, job_id: int) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def jobs(
        self,
        *,
        state: str | None = None,
        states: Iterable[str] | None = None,
        model: str | None = None,
        limit: int | None = None,
    ) -> list[Job]:
        where, args = _where(state=state, model=model)
        if states is not None:
            wanted = list(states)
            where += f" AND state IN ({', '.join('?' * len(wanted))})"
            args += wanted
        sql = "SELECT * FROM jobs" + where + " ORDER BY id"  # noqa: S608 -- fixed column names, placeholders
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [_job(r) for r in self._db.execute(sql, args)]

    def recent(
        self,
        *,
        state: str | None = None,
        model: str | None = None,
        since: str | None = None,
        limit: int | None = None,
    ) -> tuple[list[Job], int]:
        """The newest ``limit`` jobs created at or after ``since`` (an ISO time in the ledger's form), oldest first,
        and how many jobs matched in all (so a listing can say how many it left out)."""
        rows = list(self.stream(state=state, model=model, since=since, limit=limit))
        return rows, self.matching(state=state, model=model, since=since)

    def matching(self, *, state: str | None = None, model: str | None = None, since: str | None = None) -> int:
        """How many jobs :meth:`stream` would give without a limit."""
        if since is None:  # from the counts the triggers keep, not a count over every job
            where, args = _where(state=state, model=model)
            sql = "SELECT coalesce(sum(n), 0) FROM job_counts" + where  # noqa: S608 -- fixed column names
        else:
            where, args = _where(state=state, model=model, since=since)
            sql = "SELECT COUNT(*) FROM jobs" + where  # noqa: S608 -- fixed column names
        return int(self._db.execute(sql, args).fetchone()[0])

    def stream(
        self,
        *,
        state: str | None = None,
        model: str | None = None,
        since: str | None = None,
        limit: int | None = None,
    ) -> Generator[Job, None, None]:
        """The jobs created at or after ``since`` (the newest ``limit`` of them), oldest first, one at a time: the
        ledger's cursor is read as the caller goes, so a million jobs take no more memory than one."""
        where, args = _where(state=state, model=model, since=since)
        sql = "SELECT * FROM jobs" + where + " ORDER BY id"  # noqa: S608 -- fixed column names
        if limit is not None:
            sql = f"SELECT * FROM (SELECT * FROM jobs{where} ORDER BY id DESC LIMIT ?) ORDER BY id"  # noqa: S608
            args.append(limit)
        # Its own cursor, closed when the caller stops early (`jobs --json | head`), not the connection's default.
        cursor = self._db.cursor()
        try:
            for row in cursor.execute(sql, args):
                yield _job(row)
        finally:
            cursor.close()

    def failed_since(self, since: str, states: Iterable[str]) -> list[Job]:
        """Jobs in one of ``states`` whose last change is at or after ``since`` (an ISO time in the ledger's form)."""
        wanted = list(states)
        sql = (
            f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(wanted))})"  # noqa: S608 -- placeholders
            " AND updated_at >= ? ORDER BY id"
        )
        return [_job(r) for r in self._db.execute(sql, [*wanted, since])]

    def tracked(
        self, *, download: bool, auto_switch_models: Collection[str], ids: Collection[int] | None = None
    ) -> list[Job]:
        """Jobs the retrain tracker still has work on: retraining, or finished but not yet downloaded or switched.

        Filtered in SQL: the ledger's history of finished jobs grows for months and is not read on every poll.
        """
        if ids is not None and not ids:
            return []
        sql, args = _tracked_query("*", download, list(auto_switch_models), ids)
        return [_job(r) for r in self._db.execute(sql, args)]

    def tracked_rows(self, *, download: bool, auto_switch_models: Collection[str]) -> list[TrackedRow]:
        """What :meth:`tracked` finds, as the few columns the tracker's full round reads: a whole :class:`Job` per row
        cost ~18 µs (90 ms on the event loop for 5,000 jobs retraining), these a tenth of it."""
        sql, args = _tracked_query(_TRACKED_COLUMNS, download, list(auto_switch_models), None)
        return [TrackedRow(i, m, b, State(s), r, p, u) for i, m, b, s, r, p, u in self._db.execute(sql, args)]

    def unfinished(self) -> list[Job]:
        """Jobs the daemon still owes something: a step, or the move of their sources."""
        rows = self._db.execute("SELECT * FROM jobs WHERE closed = 0 ORDER BY id")  # the partial index jobs_open
        return [_job(r) for r in rows]

    def update(
        self,
        job_id: int,
        *,
        event: str | None = None,
        detail: Any = None,
        expect_state: State | None = None,
        durable: bool = True,
        **fields: Any,
    ) -> Job:
        """Set ``fields`` on a job (and log an event) in one transaction (``durable``: see :meth:`batch`).

        With ``expect_state`` the change is made only if the job is still in that state (another process — the CLI's
        ``switch`` — may have moved it on); otherwise :class:`StaleJob` is raised and nothing changes.
        """
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"unknown job fields: {sorted(unknown)}")
        values = {k: _column_value(k, v) for k, v in fields.items()}
        assignments = ", ".join([*(f"{k} = ?" for k in values), "updated_at = ?"])
        sql = f"UPDATE jobs SET {assignments} WHERE id = ?"  # noqa: S608 -- keys are from the allow-list above
        if expect_state is not None:
            sql += " AND state = ?"
        with self._tx(durable=durable):
            args = [*values.values(), self._stamp(), job_id]
            if expect_state is not None:
                args.append(expect_state)
            rows = self._db.execute(sql + " RETURNING *", args).fetchall()  # the row as changed: no second read
            if not rows:
                if expect_state is not None:
                    raise StaleJob(f"job {job_id} is no longer {expect_state}")
                raise KeyError(job_id)
            if event is not None:
                self._event(job_id, event, detail if detail is not None else _event_detail(fields))
        return _job(rows[0])

    def claim_content(
        self, job_id: int, model: str, content_sha256: str, *, inbox: str | None = None
    ) -> tuple[int, bool] | Job:
        """Move a packaged job to ``requesting`` unless the same content was sent or is being sent from the same inbox
        (the remote model's stand-in: a model renamed in the config keeps its inbox, and a name given to another inbox
        is another model). Jobs from before schema 3, which recorded no inbox, count by model name.

        Returns the job as claimed; else ``(earlier job id, still_in_flight)`` and leaves this job untouched: a
        duplicate when the earlier job's upload is done, a job to try later while the earlier one is under way (it
        may yet fail, and then this content still has to be sent).
        """
        with self._tx():
            row = self._db.execute(
                _DUPLICATE_OF, (inbox, model, content_sha256, job_id, *_SENT_OR_SENDING)
            ).fetchone()
            if row is not None:
                return int(row[0]), row[1] in _IN_FLIGHT
            [claimed] = self._db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? RETURNING *",
                (State.REQUESTING, self._stamp(), job_id),
            ).fetchall()
            self._event(job_id, "state", {"state": State.REQUESTING})
        return _job(claimed)

    def reference_header(self, model: str, inbox: str | None) -> tuple[int, tuple[str, ...]] | None:
        """(job id, header) of the model's (or inbox's) latest job whose retraining finished, if any."""
        return reference_header(self._db, model, inbox)

    def now(self) -> str:
        """The ledger's clock as an ISO timestamp (the form of every ``*_at`` column): inside a transaction, the same
        for every write it holds (one commit, one instant; it also saves a clock reading and formatting per write)."""
        return self._stamp()

    def _stamp(self) -> str:
        if not self._db.in_transaction:
            return _now_iso(self._clock)
        if self._stamp_of_tx is None:
            self._stamp_of_tx = _now_iso(self._clock)
        return self._stamp_of_tx

    def events(self, job_id: int) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT at, event, detail FROM job_events WHERE job_id = ? ORDER BY id", (job_id,))
        return [{"at": r["at"], "event": r["event"], "detail": json.loads(r["detail"] or "null")} for r in rows]

    def event(self, job_id: int, event: str, detail: Any) -> None:
        """Record an event of a job without changing it (inside :meth:`batch`, or a commit of its own)."""
        with self._tx():
            self._event(job_id, event, detail)

    def _event(self, job_id: int, event: str, detail: Any) -> None:
        self._db.execute(
            "INSERT INTO job_events (job_id, at, event, detail) VALUES (?, ?, ?, ?)",
            (job_id, self._stamp(), event, _to_json(detail)),
        )

    # -- models -------------------------------------------------------------------------------------------------------
    def set_paused(self, model: str, reason: str | None) -> None:
        now = _now_iso(self._clock) if reason else None
        with self._tx():
            self._db.execute(
                "INSERT INTO models (name, paused_reason, paused_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET"
                " paused_reason = excluded.paused_reason, paused_at = excluded.paused_at",
                (model, reason, now),
            )

    def note_model(self, model: str, *, success: bool = False, error: str | None = None) -> None:
        with self._tx():
            now = self._stamp()
            self._db.execute("INSERT INTO models (name) VALUES (?) ON CONFLICT(name) DO NOTHING", (model,))
            if success:
                self._db.execute("UPDATE models SET last_success_at = ? WHERE name = ?", (now, model))
            if error is not None:
                self._db.execute(
                    "UPDATE models SET last_error = ?, last_error_at = ? WHERE name = ?", (error, now, model)
                )

    def models(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: dict(r) for r in self._db.execute("SELECT * FROM models ORDER BY name")}

    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs per model and state: a small table the triggers keep (a count over every job takes seconds at a
        million)."""
        out: dict[str, dict[str, int]] = {}
        for r in self._db.execute("SELECT model, state, n FROM job_counts WHERE n > 0"):
            out.setdefault(r["model"], {})[r["state"]] = int(r["n"])
        return out

    def last_job(self, model: str, state: str) -> Job | None:
        """The model's newest job in ``state`` (one index lookup, however many it has)."""
        row = self._db.execute(
            "SELECT * FROM jobs WHERE model = ? AND state = ? ORDER BY id DESC LIMIT 1", (model, state)
        ).fetchone()
        return None if row is None else _job(row)


# The newest of each way a job can be a model's reference, each the last entry of its partial index (migration 10:
# the state and header terms are written as that index's, literally, or SQLite would not use it).
_REFERENCE_WHERE = "state IN ('finished', 'switched') AND header IS NOT NULL"
_REFERENCE = (
    f"SELECT id, header FROM (SELECT id, header FROM jobs WHERE inbox = ? AND {_REFERENCE_WHERE}"  # noqa: S608
    " ORDER BY id DESC LIMIT 1)"
    f" UNION ALL SELECT id, header FROM (SELECT id, header FROM jobs WHERE inbox IS NULL AND model = ? AND"
    f" {_REFERENCE_WHERE} ORDER BY id DESC LIMIT 1)"
    " ORDER BY id DESC LIMIT 1"
)
assert (State.FINISHED, State.SWITCHED) == ("finished", "switched")  # the literals above


def reference_header(db: sqlite3.Connection, model: str, inbox: str | None) -> tuple[int, tuple[str, ...]] | None:
    row = db.execute(_REFERENCE, (inbox, model)).fetchone()
    return None if row is None else (int(row[0]), tuple(json.loads(row[1])))


def sent_before(db: sqlite3.Connection, model: str, inbox: str | None, content_sha256: str) -> tuple[int, str] | None:
    """(job id, state) of the first job of this inbox (or, before schema 3, model) that sent or sends this content."""
    row = db.execute(_DUPLICATE_OF, (inbox, model, content_sha256, -1, *_SENT_OR_SENDING)).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


# -- retention ([ledger] keep_days) --------------------------------------------------------------------------------
# A job may be pruned only once nothing is left to do for it or with it: its files moved (closed), its upload
# settled, its retraining ended, its result downloaded or given up, its auto-switch done. Not `State.terminal`: that is
# the end of the upload, and an uploaded or retraining job is still followed.
PRUNABLE = frozenset(
    {State.FAILED, State.DUPLICATE, State.FINISHED, State.SWITCHED, State.RETRAIN_FAILED, State.RETRAIN_TIMEOUT}
)
_PRUNABLE = tuple(sorted(PRUNABLE))


def _settled(*, download: bool, auto_switch: Collection[str]) -> tuple[str, list[Any]]:
    """The SQL condition (and its arguments) of a job with nothing left to do; ``auto_switch`` holds the names and the
    resolved inboxes of the models that switch by themselves (a renamed model keeps its inbox)."""
    sql = f"(closed = 1 AND outcome_unknown_since IS NULL AND state IN ({', '.join('?' * len(_PRUNABLE))})"
    args: list[Any] = [*_PRUNABLE]
    if download:  # a finished retraining whose result is still to be fetched
        sql += " AND NOT (state IN (?, ?) AND result_path IS NULL)"
        args += [State.FINISHED, State.SWITCHED]
    if auto_switch:  # a finished retraining still to be switched to
        marks = ", ".join("?" * len(auto_switch))
        sql += f" AND NOT (state = ? AND (model IN ({marks}) OR inbox IN ({marks})))"
        args += [State.FINISHED, *auto_switch, *auto_switch]
    return sql + ")", args


def reference_job_ids(db: sqlite3.Connection) -> set[int]:
    """The jobs :func:`reference_header` may answer with: the newest finished one with a header per inbox (and, for
    jobs from before schema 3, per model). Retention keeps them, however old."""
    rows = db.execute(
        "SELECT MAX(id) FROM jobs WHERE state IN (?, ?) AND header IS NOT NULL"
        " GROUP BY inbox, CASE WHEN inbox IS NULL THEN model END",
        (State.FINISHED, State.SWITCHED),
    )
    return {int(row[0]) for row in rows}


def prune_batch(
    db: sqlite3.Connection,
    *,
    before: str,
    download: bool,
    auto_switch: Collection[str],
    keep: Collection[int] = (),
    limit: int = 1000,
) -> tuple[int, int]:
    """Delete up to ``limit`` jobs with nothing left to do whose last change is before ``before`` (an ISO time in the
    ledger's form), and their events, in one short write transaction. ``keep``: ids never deleted. Returns (jobs,
    events) deleted; (0, 0) when none is left."""
    settled, args = _settled(download=download, auto_switch=auto_switch)
    # No ORDER BY: the (state, updated_at) index yields the old rows of each state and LIMIT stops the walk.
    sql = f"SELECT id FROM jobs WHERE updated_at < ? AND {settled} LIMIT ?"  # noqa: S608 -- placeholders only
    db.execute("BEGIN IMMEDIATE")
    try:
        found = [int(row[0]) for row in db.execute(sql, [before, *args, limit + len(keep)])]
        ids = [job_id for job_id in found if job_id not in keep][:limit]
        events = jobs = 0
        if ids:
            marks = ", ".join("?" * len(ids))
            events = db.execute(f"DELETE FROM job_events WHERE job_id IN ({marks})", ids).rowcount  # noqa: S608
            jobs = db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids).rowcount  # noqa: S608
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return jobs, events


def held_files(
    db: sqlite3.Connection, *, download: bool, auto_switch: Collection[str]
) -> list[tuple[str | None, str, str]]:
    """(inbox, model, path relative to the inbox) of every file a job with something left to do names: its planned or
    done moves and its result. Retention never removes these."""
    settled, args = _settled(download=download, auto_switch=auto_switch)
    sql = f"SELECT inbox, model, moved_to, result_path FROM jobs WHERE NOT {settled}"  # noqa: S608 -- placeholders
    out: list[tuple[str | None, str, str]] = []
    for row in db.execute(sql, args):
        names = [*json.loads(row[2] or "[]"), row[3]]
        out += [(row[0], row[1], name) for name in names if name]
    return out


def connect_writer(path: Path) -> sqlite3.Connection:
    """A second writing connection to the daemon's ledger, for work done in a thread (retention): the daemon's own
    connection belongs to the event loop. Same durability; short transactions only."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error:
        db.close()
        raise
    return db


def iso(at: float) -> str:
    """A POSIX time in the ledger's form (the form of every ``*_at`` column), for comparing with them."""
    return _now_iso(lambda: at)


def check_whole(path: Path) -> str | None:
    """The whole ``PRAGMA quick_check`` that the daemon's start cut short (:attr:`Ledger.checked_fully`), on a read-only
    connection of its own while the daemon works. Blocking: run it in a thread (SQLite lets go of the GIL meanwhile).

    None when nothing is damaged (or it could not look: a busy ledger is not a damaged one), else what is damaged and
    what to do, as at start.
    """
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=10.0)
        try:
            problems = [str(row[0]) for row in db.execute("PRAGMA quick_check(3)")]
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        return f"{path}: the ledger is damaged ({e}); {_DAMAGED_FIX}" if is_corruption(e) else None
    if problems != ["ok"]:
        return f"{path}: the ledger is damaged (PRAGMA quick_check: {'; '.join(problems)}); {_DAMAGED_FIX}"
    return None


def lock_held(ledger_path: Path) -> bool:
    """Whether a process holds this ledger's lock (a running daemon), read from /proc/locks.

    Reading, not trying the lock: a probe that took the lock for a moment could make a daemon starting at that moment
    fail with :class:`LedgerLocked`. Raises OSError where /proc/locks cannot be read (not Linux).
    """
    try:
        st = os.stat(ledger_path.with_name(ledger_path.name + ".lock"))
    except FileNotFoundError:
        return False
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    holder = ""
    with contextlib.suppress(OSError):  # the daemon writes its pid there; it names the holder on an overlay mount,
        holder = ledger_path.with_name(ledger_path.name + ".lock").read_text().strip()  # where devices differ
    with open("/proc/locks", encoding="ascii", errors="replace") as locks:
        for line in locks:
            # "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF" (a blocked waiter's line has "->" after the number)
            fields = line.replace("->", "").split()
            if len(fields) < 6 or fields[1] != "FLOCK":
                continue
            try:
                major, minor, inode = fields[5].split(":")
                found = (int(major, 16), int(minor, 16), int(inode))
            except ValueError:
                continue
            if found == wanted or (found[2] == st.st_ino and fields[4] == holder):
                return True
    return False


def _take_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = ""
        with contextlib.suppress(OSError):
            holder = path.read_text().strip()
        msg = f"another retrain-uploader is running on this ledger (lock {path}{', pid ' + holder if holder else ''})"
        raise LedgerLocked(msg) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _split_sql(script: str) -> Iterable[str]:
    """The statements of ``script``; a trigger's body (``BEGIN ...; ...; END``) stays one statement."""
    statements: list[str] = []
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        statements.append(pending.strip())
    return statements


def _where(*, state: str | None = None, model: str | None = None, since: str | None = None) -> tuple[str, list[Any]]:
    where = " WHERE 1=1"
    args: list[Any] = []
    for column, value in (("state", state), ("model", model)):
        if value is not None:
            where += f" AND {column} = ?"
            args.append(value)
    if since is not None:
        where += " AND created_at >= ?"
        args.append(since)
    return where, args


# json.dumps(value, ensure_ascii=False) without building an encoder for each call (an event is written at every step).
_to_json = json.JSONEncoder(ensure_ascii=False).encode


def _event_detail(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k in ("state", "retrain_job_id", "error", "attempts", "moved_to")}


def _column_value(key: str, value: Any) -> Any:
    if key == "moved_to":
        return json.dumps(list(value))
    if key == "header":
        return None if value is None else _to_json(list(value))
    if key == "source_ids":
        return None if value is None else json.dumps(value)
    return value


_TRACKED_COLUMNS = "id, model, inbox, state, retrain_job_id, result_path, uploaded_at"


def _tracked_query(
    select: str, download: bool, models: list[str], ids: Collection[int] | None
) -> tuple[str, list[Any]]:
    """The rule "still tracked" (retraining; finished or switched with a result to fetch; finished with an auto-switch
    to make), stated once: by primary key for ``ids``, else one narrow index lookup per way of being tracked
    (jobs_state_result, jobs_model_state), so finished and switched jobs whose work is done are never read."""
    if ids is not None:
        sql = (
            f"SELECT {select} FROM jobs WHERE id IN ({', '.join('?' * len(ids))}) AND (state IN (?, ?)"  # noqa: S608
            f" OR (state = ? AND ((? AND result_path IS NULL) OR model IN ({', '.join('?' * len(models))})))"
            " OR (state = ? AND ? AND result_path IS NULL)) ORDER BY id"
        )
        args: list[Any] = [*ids, State.UPLOADED, State.RETRAINING, State.FINISHED, int(download), *models]
        return sql, [*args, State.SWITCHED, int(download)]
    parts = [f"SELECT {select} FROM jobs WHERE state IN (?, ?)"]  # noqa: S608
    args = [State.UPLOADED, State.RETRAINING]
    if download:
        parts.append(f"SELECT {select} FROM jobs WHERE state IN (?, ?) AND result_path IS NULL")  # noqa: S608
        args += [State.FINISHED, State.SWITCHED]
    if models:
        parts.append(f"SELECT {select} FROM jobs WHERE model IN ({', '.join('?' * len(models))}) AND state = ?")  # noqa: S608
        args += [*models, State.FINISHED]
    return " UNION ".join(parts) + " ORDER BY id", args


def _job(row: sqlite3.Row) -> Job:
    """A :class:`Job` from a ``SELECT *`` (or ``RETURNING *``) row of ``jobs``.

    Read by position and set slot by slot: a row is read back after each of a job's steps (~10 times per file), and
    32 look-ups by name plus the frozen dataclass's checked ``__init__`` cost 18 µs a row, this about 7."""
    values = tuple(row)
    plan = _ROW_PLANS.get(len(values))
    if plan is None:
        plan = _ROW_PLANS[len(values)] = _row_plan(row.keys())
    job = _new_job(Job)
    for setter, index, convert in plan:
        value = values[index] if index >= 0 else None
        setter(job, value if convert is None else convert(value))
    return job


# A job's row is read back after each of its steps with the same sources, targets, header and source identities: each
# text is decoded once, and the value shared by the Job objects read from it (tuples; the identities' dict is never
# changed by a caller: a new identity is a new value, written through update()). Bounded: each cache is cleared whole
# when full (a new backlog's rows fill it again).
_NAMES: dict[str, tuple[str, ...]] = {}
_SOURCE_IDS: dict[str, dict[str, list[int]]] = {}
_DECODED_MAX = 4096


def _decoded(cache: dict[str, _T], text: str, decode: Callable[[str], _T]) -> _T:
    value = cache.get(text)
    if value is None:
        value = decode(text)
        if len(cache) >= _DECODED_MAX:
            cache.clear()
        cache[text] = value
    return value


def _names(text: str) -> tuple[str, ...]:
    return _decoded(_NAMES, text, _name_tuple)


def _name_tuple(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _source_ids(text: str | None) -> dict[str, list[int]] | None:
    return _decoded(_SOURCE_IDS, text, json.loads) if text else None


def _header(text: str | None) -> tuple[str, ...] | None:
    return _names(text) if text else None


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "sources": _names,
    "state": State,
    "put_started": bool,
    "moved_to": _names,
    "closed": bool,
    "source_ids": _source_ids,
    "header": _header,
}
_new_job = object.__new__
# By the number of columns a row has (a schema only ever adds columns): each field's slot setter, its column's position
# (-1: not in this schema yet, so None) and its conversion. The slot's own setter skips the frozen class's check.
_ROW_PLANS: dict[int, list[tuple[Callable[[Job, Any], None], int, Callable[[Any], Any] | None]]] = {}


def _row_plan(columns: Sequence[str]) -> list[tuple[Callable[[Job, Any], None], int, Callable[[Any], Any] | None]]:
    position = {name: i for i, name in enumerate(columns)}
    return [
        (Job.__dict__[f.name].__set__, position.get(f.name, -1), _CONVERT.get(f.name))
        for f in dataclasses.fields(Job)
    ]
