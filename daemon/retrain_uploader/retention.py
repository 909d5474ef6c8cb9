"""Opt-in retention: old jobs out of the ledger (``[ledger] keep_days``), old files out of ``done/``
(``[retention] done_days``). With neither set nothing is deleted.

Both run at start, after each reload and every ``[retention] interval_s``, in a thread with a connection of its own
(the daemon's connection belongs to the event loop). The ledger is pruned in batches, each one short transaction, with
a pause between them so the daemon's own writes never wait behind more than one batch. The pages freed are given back
to the filesystem (``PRAGMA incremental_vacuum``); a ledger made before ``auto_vacuum = INCREMENTAL`` is compacted once
with ``VACUUM`` at the first start with ``keep_days`` set, before the daemon takes work.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .config import Settings
from .ledger import connect_writer, held_files, iso, prune_batch, reference_job_ids

__all__ = ["DoneSweep", "LedgerPrune", "Retention", "make_incremental", "prune_ledger", "sweep_done"]

log = structlog.get_logger("retrain_uploader.retention")

_DAY_S = 86400.0
_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
_VACUUM_STEP_PAGES = 1024  # pages given back per statement: each is a short write


@dataclass(frozen=True, slots=True)
class LedgerPrune:
    jobs: int = 0
    events: int = 0
    batches: int = 0
    pages_freed: int = 0


@dataclass(frozen=True, slots=True)
class DoneSweep:
    files: int = 0
    bytes: int = 0
    errors: tuple[str, ...] = ()  # one per file that could not be removed (permission denied, say)
    skipped: str | None = None  # why done/ was not looked into at all


def prune_ledger(
    path: Path,
    *,
    keep_days: float,
    now: float,
    download: bool,
    auto_switch: Collection[str] = (),
    batch: int = 1000,
    pause_s: float = 0.05,
    stopping: threading.Event | None = None,
) -> LedgerPrune:
    """Delete jobs with nothing left to do whose last change is older than ``keep_days`` before ``now``, with their
    events, ``batch`` jobs per transaction; then give the freed pages back. Blocking: run it in a thread.

    ``download`` and ``auto_switch`` (model names and resolved inboxes) say which finished jobs still have work.
    """
    before = iso(now - keep_days * _DAY_S)
    db = connect_writer(path)
    try:
        keep = reference_job_ids(db)  # each model's reference header: never pruned
        jobs = events = batches = 0
        while stopping is None or not stopping.is_set():
            done_jobs, done_events = prune_batch(
                db, before=before, download=download, auto_switch=auto_switch, keep=keep, limit=batch
            )
            if done_jobs == 0:
                break
            jobs, events, batches = jobs + done_jobs, events + done_events, batches + 1
            if pause_s:
                time.sleep(pause_s)  # the daemon's writes go first
        pages = _free_pages(db, stopping, pause_s) if jobs else 0
        return LedgerPrune(jobs=jobs, events=events, batches=batches, pages_freed=pages)
    finally:
        db.close()


def _free_pages(db: sqlite3.Connection, stopping: threading.Event | None, pause_s: float) -> int:
    """Give the free pages back to the filesystem, ``_VACUUM_STEP_PAGES`` per write transaction, pausing between steps
    like the prune's batches. Returns the pages actually given back (the freelist's fall, not the steps asked)."""
    if int(db.execute("PRAGMA auto_vacuum").fetchone()[0]) != _INCREMENTAL:
        return 0
    first = free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    while free and (stopping is None or not stopping.is_set()):
        # executescript steps the pragma to its end; execute() would step it once and free a single page.
        db.executescript(f"PRAGMA incremental_vacuum({min(free, _VACUUM_STEP_PAGES)});")
        now = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        if now >= free:  # nothing given back (a reader holds an old snapshot, say): next pass
            break
        free = now
        if free and pause_s:
            time.sleep(pause_s)  # the daemon's writes go first
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # the file shrinks once the WAL is copied back
    return first - free


def make_incremental(path: Path, before_vacuum: Callable[[], object] | None = None) -> tuple[int, int] | None:
    """Switch a ledger made without ``auto_vacuum = INCREMENTAL`` to it: one ``VACUUM``, which rewrites the whole file
    (it needs free space of about its size, and nothing else may write meanwhile: run it before the daemon takes work).
    Returns the file's size before and after, or None when it was incremental already."""
    db = connect_writer(path)
    try:
        if int(db.execute("PRAGMA auto_vacuum").fetchone()[0]) == _INCREMENTAL:
            return None
        before = _size(path)
        if before_vacuum is not None:
            before_vacuum()
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return before, _size(path)
    finally:
        db.close()


def _size(path: Path) -> int:
    return sum(os.stat(p).st_size for p in (path, path.with_name(path.name + "-wal")) if os.path.exists(p))


def sweep_done(inbox: Path, *, older_than: float, held: Collection[str] = ()) -> DoneSweep:
    """Remove the regular files directly in ``inbox/done`` that last changed (or were moved there) before
    ``older_than`` (a POSIX time), except those named in ``held``. Blocking: run it in a thread.

    Never follows a symlink: a ``done/`` that is one is not looked into (it points at an archive kept by someone
    else), and a symlink inside it is left as it is. Hidden files (a result or a copy under way) and folders are left
    too.
    """
    try:
        fd = os.open(inbox / "done", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return DoneSweep()
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # Linux says ENOTDIR for a symlink with O_DIRECTORY
            link = os.path.islink(inbox / "done")
            return DoneSweep(skipped="done/ is a symlink: not followed" if link else "done/ is not a folder")
        return DoneSweep(skipped=f"cannot open done/: {e.strerror}")
    files = size = 0
    errors: list[str] = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name in held:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or max(st.st_mtime, st.st_ctime) >= older_than:
                        continue
                    os.unlink(entry.name, dir_fd=fd)
                except FileNotFoundError:
                    continue  # gone meanwhile
                except OSError as e:
                    errors.append(f"{entry.name}: {e.strerror}")
                    continue
                files += 1
                size += st.st_size
    except OSError as e:  # done/ unreadable
        return DoneSweep(files=files, bytes=size, errors=(*errors, f"cannot list done/: {e.strerror}"))
    finally:
        os.close(fd)
    return DoneSweep(files=files, bytes=size, errors=tuple(errors))


def _held_in_done(held: Iterable[tuple[str | None, str, str]], inbox: str, model: str) -> set[str]:
    names: set[str] = set()
    for job_inbox, job_model, relative in held:
        if job_inbox == inbox or (job_inbox is None and job_model == model):
            parts = Path(relative).parts
            if len(parts) == 2 and parts[0] == "done":
                names.add(parts[1])
    return names


@dataclass
class _Run:
    """What one pass did, logged on the loop."""

    prune: LedgerPrune | None = None
    swept: dict[tuple[str, str], DoneSweep] = field(default_factory=dict)  # (model, inbox) -> result
    error: str | None = None
    took_s: float = 0.0


class Retention:
    """Applies ``keep_days`` and ``done_days`` at start, on :meth:`poke` (a reload) and every ``interval_s``.

    ``settings`` is read at each pass, so a reload's values apply at once.
    """

    def __init__(self, settings: Callable[[], Settings], *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = threading.Event()
        self._skipped: set[str] = set()  # done/ folders already reported as not looked into

    async def prepare(self, before_vacuum: Callable[[], object] | None = None) -> None:
        """At start, before the daemon writes: the one ``VACUUM`` an older ledger needs once ``keep_days`` is set.

        ``before_vacuum`` is called (from a thread) just before a VACUUM starts: under systemd, to extend the start
        timeout, since a VACUUM of a large ledger can take minutes."""
        settings = self._settings()
        if settings.ledger.keep_days is None:
            return
        started = time.monotonic()
        try:
            sizes = await asyncio.to_thread(make_incremental, settings.ledger.path, before_vacuum)
        except sqlite3.Error as e:
            log.warning("ledger.vacuum_failed", error=str(e), action="pruning goes on; space is reused, not returned")
            return
        if sizes is not None:
            log.info(
                "ledger.vacuumed",
                path=str(settings.ledger.path),
                bytes_before=sizes[0],
                bytes_after=sizes[1],
                took_s=round(time.monotonic() - started, 3),
                reason="auto_vacuum switched to incremental (once)",
            )

    def poke(self) -> None:
        """Run a pass now (the config was reloaded)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.run_once()
                except Exception:  # a bug: said loudly, and tried again next interval; never the end of retention
                    log.exception("retention.crashed")
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    timeout = self._settings().retention.interval_s
                    await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
        finally:
            self._stopping.set()  # a pass under way in its thread ends after its current batch

    async def run_once(self) -> None:
        """One pass of whatever is configured (nothing when neither key is set)."""
        settings = self._settings()
        if settings.ledger.keep_days is None and settings.retention.done_days is None:
            return
        result = await asyncio.to_thread(self._pass, settings, self._clock())
        self._report(result)

    def _pass(self, settings: Settings, now: float) -> _Run:
        started = time.monotonic()
        out = _Run()
        auto_switch = {m.name for m in settings.models if m.auto_switch}
        auto_switch |= {str(m.inbox.resolve()) for m in settings.models if m.auto_switch}
        download = settings.status.download_result
        path = settings.ledger.path
        try:
            if settings.ledger.keep_days is not None:
                out.prune = prune_ledger(
                    path,
                    keep_days=settings.ledger.keep_days,
                    now=now,
                    download=download,
                    auto_switch=auto_switch,
                    stopping=self._stopping,
                )
            if settings.retention.done_days is not None:
                db = connect_writer(path)
                try:
                    held = held_files(db, download=download, auto_switch=auto_switch)
                finally:
                    db.close()
                older_than = now - settings.retention.done_days * _DAY_S
                seen: set[str] = set()
                for model in settings.models:
                    inbox = str(model.inbox.resolve())
                    if inbox in seen or self._stopping.is_set():
                        continue
                    seen.add(inbox)
                    out.swept[(model.name, inbox)] = sweep_done(
                        model.inbox, older_than=older_than, held=_held_in_done(held, inbox, model.name)
                    )
        except sqlite3.Error as e:  # the ledger busy for longer than its timeout, say: next pass
            out.error = str(e)
        out.took_s = time.monotonic() - started
        return out

    def _report(self, run: _Run) -> None:
        if run.error is not None:
            log.warning("retention.failed", error=run.error, retry_in_s=self._settings().retention.interval_s)
        if run.prune is not None and run.prune.jobs:
            log.info(
                "ledger.pruned",
                jobs=run.prune.jobs,
                events=run.prune.events,
                batches=run.prune.batches,
                pages_freed=run.prune.pages_freed,
                keep_days=self._settings().ledger.keep_days,
                took_s=round(run.took_s, 3),
            )
        for (model, inbox), sweep in run.swept.items():
            done = str(Path(inbox) / "done")
            if sweep.skipped is not None:
                if done not in self._skipped:  # once per folder, not every hour
                    self._skipped.add(done)
                    log.warning("retention.skipped", model=model, path=done, reason=sweep.skipped)
                continue
            self._skipped.discard(done)
            if sweep.files:
                log.info("retention.removed", model=model, path=done, files=sweep.files, bytes=sweep.bytes)
            if sweep.errors:
                log.warning(
                    "retention.remove_failed",
                    model=model,
                    path=done,
                    files=len(sweep.errors),
                    error=sweep.errors[0],
                    action="check the owner and mode of these files; they are tried again at the next pass",
                )
