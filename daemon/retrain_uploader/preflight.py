"""Pre-flight without side effects: ``retrain-uploader check`` and ``run --dry-run``.

Both run the daemon's exact checks (:func:`runner.build_package` with the model's rules) and call no API. Nothing is
moved, deleted or written where the daemon keeps anything: a pair or a macOS zip is built in a temporary folder that
is removed at once, and the ledger, if there is one, is only read (SQLite ``mode=ro``; the daemon's lock is not taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from .checks import InputError
from .config import ModelSettings, Settings
from .ledger import LedgerUnreadable, connect_read_only, reference_header, sent_before
from .packager import Package, source_identity
from .rules import model_rules
from .runner import build_package, inbox_key
from .watcher import Candidate, InboxWatcher, Reject, is_ignored, plan

__all__ = ["Verdict", "check_paths", "dry_run"]

log = structlog.get_logger("retrain_uploader.preflight")


@dataclass(slots=True)
class Verdict:
    """One input's result; :meth:`as_dict` is the ``check --json`` line."""

    path: str
    ok: bool
    reason: str | None = None
    what_to_do: str | None = None  # for a refusal: the advice the daemon's error file would give
    warnings: list[str] = field(default_factory=list)
    upload_filename: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    kind: str | None = None
    model: str | None = None
    already_sent_as_job: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "reason": self.reason,
            "what_to_do": self.what_to_do,
            "warnings": self.warnings,
            "upload_filename": self.upload_filename,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "kind": self.kind,
            "model": self.model,
            "already_sent_as_job": self.already_sent_as_job,
        }


@contextlib.contextmanager
def _read_only(path: Path | None) -> Iterator[sqlite3.Connection | None]:
    """The ledger opened read-only, or None if there is none (or it cannot be read: check still works without)."""
    if path is None or not path.is_file():
        yield None
        return
    try:
        db = connect_read_only(path)
        db.execute("SELECT header FROM jobs LIMIT 0")  # schema 5 or later
    except (sqlite3.Error, LedgerUnreadable):
        yield None
        return
    try:
        yield db
    finally:
        db.close()


def _judge(
    candidate: Candidate, folder: Path, settings: Settings, model: ModelSettings | None,
    db: sqlite3.Connection | None, shown: str,
) -> Verdict:
    verdict = Verdict(path=shown, ok=False, kind=candidate.kind, model=model.name if model else None,
                      upload_filename=candidate.upload_filename)
    inbox = inbox_key(model.inbox) if model else None
    try:
        last = reference_header(db, model.name, inbox) if db is not None and model is not None else None
        rules = model_rules(model, last) if model is not None else None
    except (ValueError, sqlite3.Error) as e:
        verdict.reason = str(e)
        verdict.what_to_do = "Fix `header_file` in the config (or make the ledger readable), then check again."
        return verdict
    paths = [folder / name for name in candidate.sources]
    try:
        with tempfile.TemporaryDirectory(prefix="retrain-uploader-check-") as tmp:
            pkg: Package = build_package(candidate.kind, candidate.name, paths, settings,
                                         rules or model_rules(_NO_RULES, None), job_id=0, staging_dir=Path(tmp))
    except InputError as e:
        verdict.reason = str(e)
        verdict.what_to_do = e.hint or "Fix the file, then check it again."
        return verdict
    except FileNotFoundError as e:
        verdict.reason = f"{e.filename}: no such file"
        verdict.what_to_do = "Give the path of an existing file."
        return verdict
    verdict.ok = True
    verdict.warnings = list(pkg.warnings) + [f"macOS leftovers removed when packaging: {', '.join(pkg.removed_entries)}"
                                             for _ in pkg.removed_entries[:1]]
    verdict.size_bytes, verdict.sha256 = pkg.size_bytes, pkg.sha256
    if db is not None and model is not None:
        with contextlib.suppress(sqlite3.Error):
            earlier = sent_before(db, model.name, inbox, pkg.content_sha256)
            if earlier is not None:
                verdict.already_sent_as_job = earlier[0]
                verdict.warnings.append(f"already sent as job {earlier[0]} ({earlier[1]}); the daemon would not "
                                        "upload it again")
    return verdict


def _judge_reading(candidate: Candidate, settings: Settings, model: ModelSettings) -> Verdict:
    with _read_only(settings.ledger.path) as db:  # a connection per thread: sqlite3 objects stay in theirs
        return _judge(candidate, model.inbox, settings, model, db, candidate.upload_filename)


_REJECT_HINT = "Drop a .csv, a .zip, or a pair NAME.train.csv + NAME.eval.csv with a UTF-8 name."
_NO_RULES = ModelSettings(name="none", inbox=Path("/nonexistent/retrain-uploader-check"), api_key_env="UNUSED")


def model_for(settings: Settings | None, folder: Path, name: str | None) -> ModelSettings | None:
    """``--model NAME``, else the model whose inbox is ``folder``, else none (shape checks only)."""
    if settings is None:
        return None
    if name is not None:
        return settings.model(name)  # KeyError for an unknown name: the CLI says so
    real = folder.resolve()
    return next((m for m in settings.models if m.inbox.resolve() == real), None)


def check_paths(paths: Sequence[Path], settings: Settings | None, model_name: str | None) -> list[Verdict]:
    """Judge every path (files, grouped per folder as the watcher groups an inbox: a pair is its two halves)."""
    base = settings or Settings.model_validate({"models": [_NO_RULES]})
    verdicts: list[Verdict] = []
    by_folder: dict[Path, list[str]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path.name)
    with _read_only(settings.ledger.path if settings else None) as db:
        for folder, names in by_folder.items():
            model = model_for(settings, folder, model_name)
            found = plan(names)
            for candidate in found.candidates:
                shown = " + ".join(str(folder / n) for n in candidate.sources)
                verdicts.append(_judge(candidate, folder, base, model, db, shown))
            for half in found.halves:
                other = "eval" if ".train." in half.lower() else "train"
                verdicts.append(Verdict(path=str(folder / half), ok=False, kind="pair",
                                        reason=f"{half}: one half of a pair; give its NAME.{other}.csv too",
                                        what_to_do=f"Check (and drop) it together with its NAME.{other}.csv."))
            for reject in found.rejects:
                verdicts.append(Verdict(path=str(folder / reject.name), ok=False, reason=reject.reason,
                                        what_to_do=_REJECT_HINT))
            for name in names:
                if is_ignored(name):
                    verdicts.append(Verdict(path=str(folder / name), ok=False,
                                            reason="a hidden or temporary name: the daemon ignores it",
                                            what_to_do="Give it a name that does not start with \".\" nor end in "
                                                       "a temporary suffix (.part, .tmp, ~, ...)."))
    return verdicts


async def dry_run(settings: Settings, *, stop: asyncio.Event | None = None, handle_signals: bool = True) -> int:
    """Watch every inbox as ``run`` does; log ``dryrun.would_upload`` or ``dryrun.refused`` once per file version.

    No API call, nothing moved, deleted or created in the inboxes, the ledger only read.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    judged: dict[tuple[str, str], list[int]] = {}
    tasks: set[asyncio.Task[None]] = set()

    def identity(inbox: Path, name: str) -> list[int]:
        # The daemon's own identity of a file version (ctime included: a rewrite in place is another version).
        try:
            return source_identity(inbox / name)
        except OSError:
            return []

    def seen(model: ModelSettings, name: str) -> bool:
        return judged.get((model.name, name)) == identity(model.inbox, name)

    async def on_candidate(model: ModelSettings, candidate: Candidate) -> None:
        for name in candidate.sources:
            judged[(model.name, name)] = identity(model.inbox, name)
        verdict = await asyncio.to_thread(_judge_reading, candidate, settings, model)
        if verdict.ok:
            log.info("dryrun.would_upload", model=model.name, file=verdict.upload_filename, kind=verdict.kind,
                     sources=list(candidate.sources), size_bytes=verdict.size_bytes, sha256=verdict.sha256,
                     warnings=verdict.warnings, already_sent_as_job=verdict.already_sent_as_job)
        else:
            log.warning("dryrun.refused", model=model.name, file=verdict.upload_filename,
                        sources=list(candidate.sources), error=verdict.reason)

    async def on_reject(model: ModelSettings, reject: Reject) -> None:
        log.warning("dryrun.refused", model=model.name, file=reject.name, error=reject.reason)

    watchers = []
    for model in settings.models:
        if not model.inbox.is_dir():
            log.error("dryrun.inbox_missing", model=model.name, inbox=str(model.inbox))
            continue
        watchers.append(InboxWatcher(
            model.name, model.inbox, settings.watch,
            on_candidate=lambda c, m=model: on_candidate(m, c),  # type: ignore[misc]
            on_reject=lambda r, m=model: on_reject(m, r),  # type: ignore[misc]
            is_taken=lambda name, m=model: seen(m, name),  # type: ignore[misc]
        ))
    log.info("dryrun.started", models=[w.model for w in watchers], ledger=str(settings.ledger.path))
    for watcher in watchers:
        task = asyncio.create_task(watcher.run(stop), name=f"dryrun-{watcher.model}")
        tasks.add(task)
    try:
        await stop.wait()
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("dryrun.stopped")
    return 0
