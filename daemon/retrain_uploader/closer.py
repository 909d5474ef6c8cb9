"""Closing a job: its sources renamed to done/ or failed/ (with the error file), its staging zip removed.

Idempotent: the targets are stored in the ledger before the first rename, so closing again after a crash finishes
the same moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Any

import structlog

from .ledger import Job, Ledger, State
from .mover import apply_moves, fits, plan_moves, rename_no_replace, same_file, with_tag, write_error_file
from .packager import moved_intact, source_identity
from .watcher import DONE_DIR, FAILED_DIR, printable_name

__all__ = ["close_job", "close_job_off_loop", "drop_staged", "taken_name"]

log = structlog.get_logger("retrain_uploader.closer")


def close_job(ledger: Ledger, job: Job, inbox: Path) -> Job:
    """Move the sources out of ``inbox``, write the error file of a failed job, mark the job closed."""
    if job.closed:
        return job
    job, failed_detail = _prepare(ledger, job, inbox)
    missing, replaced = _carry_out(job, inbox, failed_detail)
    return _record(ledger, job, missing, replaced)


async def close_job_off_loop(ledger: Ledger, job: Job, inbox: Path) -> Job:
    """:func:`close_job` with the file work in a thread: a move into an archive on another filesystem is a copy
    that can take minutes. The ledger is only touched from the caller's thread.

    A job whose close is a few renames on one filesystem (small sources, no staging zip, no error file) is closed on
    the loop: a thread hop costs more CPU than the renames."""
    if job.closed:
        return job
    job, failed_detail = _prepare(ledger, job, inbox)
    if failed_detail is None and _renames_only(job, inbox):
        missing, replaced = _carry_out(job, inbox, None)
    else:
        missing, replaced = await asyncio.to_thread(_carry_out, job, inbox, failed_detail)
    return _record(ledger, job, missing, replaced)


# Sources up to this many bytes in all: should a rename still meet another filesystem (a bind mount), the copy it falls
# back to is short.
_INLINE_MAX = 256 << 10


def _renames_only(job: Job, inbox: Path) -> bool:
    """Whether closing ``job`` is only renames within one filesystem: no staging zip to delete, and every target folder
    on the device its (small) sources were checked on."""
    if job.package_path or not job.source_ids or len(job.moved_to) != len(job.sources):
        return False
    ids = [job.source_ids.get(name) for name in job.sources]
    if any(ident is None or len(ident) < 3 for ident in ids) or sum(i[2] for i in ids if i) > _INLINE_MAX:
        return False
    devices = {ident[0] for ident in ids if ident}
    try:
        folders = {os.stat(inbox / os.path.dirname(target)).st_dev for target in job.moved_to}
    except OSError:
        return False  # the thread reports it
    return len(devices) == 1 and folders == devices


def _prepare(ledger: Ledger, job: Job, inbox: Path) -> tuple[Job, dict[str, Any] | None]:
    failed = job.state is State.FAILED
    if not job.moved_to:
        targets = plan_moves(
            inbox,
            job.sources,
            FAILED_DIR if failed else DONE_DIR,
            job_id=job.id,
            error_stem=job.name if failed else None,
        )
        job = ledger.update(job.id, moved_to=targets)
    if not failed:
        return job, None
    failed_event = next((e for e in reversed(ledger.events(job.id)) if e["event"] == "failed"), None)
    return job, (failed_event["detail"] if failed_event else {}) or {}


def _carry_out(job: Job, inbox: Path, failed_detail: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """The file work of closing (no ledger access: this may run in a thread). Returns (missing, replaced)."""
    mine, origins, replaced, missing = _take(inbox, job)
    gone = apply_moves(inbox, origins, [job.moved_to[i] for i in mine])
    missing += [job.sources[i] for i, origin in zip(mine, origins, strict=True) if origin in gone]
    if failed_detail is not None:
        write_error_file(inbox / job.moved_to[-1], _error_content(job, failed_detail, missing, replaced))
    drop_staged(job)
    return missing, replaced


def _record(ledger: Ledger, job: Job, missing: list[str], replaced: list[str]) -> Job:
    for name in replaced:
        log.warning(
            "job.source_replaced",
            **job.log_fields(),
            source=name,
            action="left in the inbox: it is not the file this job checked, and becomes a job of its own",
        )
    # Replaced sources' planned names in done/ or failed/ were never used: released ("") so another job may take them,
    # in the same commit that closes the job.
    kept = [("" if name in replaced else target) for name, target in zip(job.sources, job.moved_to, strict=False)]
    moved_to = kept + list(job.moved_to[len(job.sources) :])
    # Not flushed (durable=False): lost to a power cut, the job is closed again from its plan (durable), which finds
    # every file already moved.
    job = ledger.update(
        job.id,
        moved_to=moved_to,
        closed=1,
        event="closed",
        detail={"moved_to": moved_to, "replaced": replaced or None},
        durable=False,
    )
    log.info(
        "job.closed",
        model=job.model,
        job_id=job.id,
        file=job.upload_filename,
        state=str(job.state),
        moved_to=list(job.moved_to),
        missing=missing or None,
    )
    return job


def taken_name(job_id: int, index: int, recorded: list[int]) -> str:
    """The hidden name in the inbox a job's source is renamed to while it is closed (see :func:`_take`).

    It holds the inode the job checked: a file left at such a name (by a crash under an earlier ledger whose job ids
    were the same) keeps that inode in use, so no file this job checked can have it, and the names never meet."""
    return f".retrain-uploader.job{job_id}.{index}.{recorded[1]}.closing"


def _take(inbox: Path, job: Job) -> tuple[list[int], list[str], list[str], list[str]]:
    """The sources to move (their indexes, and the names to move them from), the names now held by another file than
    the one this job checked (left in the inbox: each becomes a job of its own), and the sources that are gone.

    Checking a name and then renaming it are two steps: a file renamed over the name between them would be moved as
    this job's. So a source is first taken: renamed (atomically, whatever the name holds at that instant) to a hidden
    name of this job's, and only the file taken is checked; one that is not the file this job checked is put back.
    Nothing but the checked file ever reaches done/ or failed/, not even for a moment. A crash leaves the file at the
    hidden name, where closing again finds it. Jobs from before schema 3 recorded no identity: theirs are moved as
    before. A source already at its target (a replay after a crash) is left alone.
    """
    mine: list[int] = []
    origins: list[str] = []
    replaced: list[str] = []
    missing: list[str] = []
    for i, name in enumerate(job.sources):
        recorded = (job.source_ids or {}).get(name)
        if recorded is None or len(recorded) < 4:
            mine.append(i)
            origins.append(name)
            continue
        taken = taken_name(job.id, i, recorded)
        # A reject's name that is not UTF-8 is recorded as shown (escaped): the entry's own name is found for it.
        entry = real_name(name) if job.kind == "reject" else name
        if os.path.lexists(inbox / job.moved_to[i]):
            if os.path.lexists(inbox / taken):  # a copy to another filesystem, cut off before it removed its source
                mine.append(i)
                origins.append(taken)
            continue  # moved already; whatever stands at `name` now is a newer drop
        if not os.path.lexists(inbox / taken):
            if entry != name:
                entry = on_disk_name(inbox, name, recorded)
            now = source_identity(inbox / entry)
            if now and now != recorded:
                replaced.append(name)
                continue
            try:
                if not now:
                    raise FileNotFoundError(name)
                os.rename(inbox / entry, inbox / taken)
            except FileNotFoundError:
                # The user took it. Never handed to a move by its name: a file dropped there meanwhile is not this
                # job's to move.
                missing.append(name)
                continue
        if moved_intact(recorded, source_identity(inbox / taken)):
            mine.append(i)
            origins.append(taken)
        else:
            _put_back(inbox, job, entry, taken)
            replaced.append(name)
    return mine, origins, replaced, missing


def on_disk_name(inbox: Path, name: str, recorded: list[int]) -> str:
    """The name in the inbox of a source recorded as ``name``: itself, or, for a name that is not UTF-8 (recorded as
    shown, with ``\\xff`` escapes: the ledger holds text), the entry that shows as ``name`` and has the recorded inode.
    Looked for only when ``name`` could be such an escape."""
    if "\\x" not in name:
        return name
    for candidate in (name, real_name(name)):  # a file may also be named with that text itself: its inode tells
        with contextlib.suppress(OSError):
            if os.lstat(inbox / candidate).st_ino == recorded[1]:
                return candidate
    with contextlib.suppress(OSError), os.scandir(inbox) as entries:  # escapes that were text in the name
        for entry in entries:
            if printable_name(entry.name) == name and entry.inode() == recorded[1]:
                return entry.name
    return name


def real_name(shown: str) -> str:
    """The name whose bytes :func:`printable_name` showed as ``shown`` (``\\xff`` escapes back to bytes), when that is
    not UTF-8; else ``shown`` itself (its escapes were text)."""
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), shown.encode("utf-8"))
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(raw)
    return shown


def _put_back(inbox: Path, job: Job, name: str, taken: str) -> None:
    """A file dropped in the instant between the check and the take: back under its name, or, should a newer drop
    hold that name already, under ``NAME.jobN-restored.csv`` beside it (a job of its own, never lost).

    When it cannot be put back (a full filesystem: the put-back is a link), OSError: the job is not closed, and
    closing it again later (``job.close_failed``) finds the file at the hidden name and tries again."""
    names = [name]
    for tag in (f"job{job.id}-restored", f"job{job.id}-restored-{os.lstat(inbox / taken).st_ino}"):
        restored = with_tag(name, tag)
        names.append(restored if fits(restored) else f"{tag}.csv")
    for back in names:
        try:
            rename_no_replace(inbox / taken, inbox / back)
        except FileExistsError:
            if same_file(inbox / taken, inbox / back):
                # A kill -9 between the put-back's link and its unlink: it is back already.
                (inbox / taken).unlink()
                return
            continue
        if back != name:
            log.warning("job.source_restored_as", **job.log_fields(), source=name, restored_as=back)
        return
    raise FileExistsError(errno.EEXIST, f"cannot put back a file dropped as {name}: its names are taken", taken)


def drop_staged(job: Job) -> None:
    """Remove the job's staging zip (and a partial one), if it has one. Sources are never touched here."""
    if job.package_path:
        Path(job.package_path).unlink(missing_ok=True)
        Path(job.package_path + ".part").unlink(missing_ok=True)


def _error_content(job: Job, detail: dict[str, Any], missing: list[str], replaced: list[str]) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "model": job.model,
        "sources": list(job.sources),
        "moved_to": list(job.moved_to[: len(job.sources)]),
        "missing": missing,
        "replaced": replaced,
        "upload_filename": job.upload_filename,
        "failed_at_state": detail.get("at_state"),
        "error": job.error,
        "what_to_do": detail.get("hint") or f"Read the error, fix the cause, then `retrain-uploader retry {job.id}`.",
        "retrain_job_id": job.retrain_job_id,
        "sha256": job.sha256,
        "failed_at": job.updated_at,
    }
