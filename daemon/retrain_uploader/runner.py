"""Carries one job through its states: package → request an upload URL → PUT → move the sources.

Every step is committed to the ledger before the next begins. The runner decides nothing about scheduling: it
returns an :class:`Outcome` and the service queues, delays or parks the job accordingly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from . import checks, packager
from .bandwidth import UploadWindow
from .client import ApiError, Client, JobStatus, SourceChanged, TransportError, UploadCut, UploadMeter, UploadTicket
from .closer import close_job, close_job_off_loop, drop_staged
from .config import ModelSettings, Settings
from .ledger import Job, Ledger, State, TrackedRow
from .metrics import Metrics
from .mover import plan_moves
from .outcome import Arrived, KeyRefused, NotArrived, PauseModel, RemoteJobGone, decide, read_answer
from .packager import source_identities
from .policy import Fail, Pause, RenewUrl, Retry, backoff_delay, classify
from .progress import ProgressReporter
from .redact import scrub
from .rules import Rules, model_rules
from .streamcheck import StreamCheck
from .watcher import DONE_DIR, FAILED_DIR, printable_name

__all__ = [
    "Closed",
    "ModelContext",
    "Outcome",
    "Parked",
    "RetryLater",
    "Runner",
    "WaitForWindow",
    "build_package",
    "context_for",
    "inbox_key",
]

log = structlog.get_logger("retrain_uploader.runner")


@dataclass(slots=True)
class ModelContext:
    """What the runner needs of a model at run time (the service owns it and updates it)."""

    settings: ModelSettings
    api_key: str
    paused_reason: str | None = None
    parked: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def inbox(self) -> Path:
        return self.settings.inbox


def inbox_key(inbox: Path) -> str:
    """The form in which a job records its inbox (and the service keys the files it holds)."""
    return str(inbox.resolve())


def context_for(models: Mapping[str, ModelContext], job: Job | TrackedRow) -> ModelContext | None:
    """The model a job belongs to: by name, else the model that now watches the job's inbox (renamed in the
    config: the same inbox is the same remote model)."""
    ctx = models.get(job.model)
    if ctx is not None or job.inbox is None:
        return ctx
    return next((c for c in models.values() if inbox_key(c.inbox) == job.inbox), None)


@dataclass(frozen=True, slots=True)
class Closed:
    state: State


@dataclass(frozen=True, slots=True)
class RetryLater:
    delay_s: float


@dataclass(frozen=True, slots=True)
class Parked:
    reason: str


@dataclass(frozen=True, slots=True)
class WaitForWindow:
    """The upload window is closed: run the job again when it opens."""


Outcome = Closed | RetryLater | Parked | WaitForWindow

_HINTS = {
    "input": (
        "Fix the file and drop it into the inbox again. If it was still being copied when it was taken, copy it "
        "under a .part name and rename it when complete, or raise [watch] settle_s."
    ),
    "api": "The API refused this upload; read the error, fix the cause, then `retrain-uploader retry {id}`.",
    "gave_up": "The API or network kept failing; once it is healthy, `retrain-uploader retry {id}`.",
    "reject": "Replace it with a regular, supported file in the inbox.",
    "gone": (
        "The file may or may not have been received before the remote job disappeared. Check the model's retraining"
        " history in Prediction One; only if no retraining ran for it, `retrain-uploader retry {id}`."
    ),
}


def _input_hint(error: checks.InputError) -> str:
    """The check's own advice when it has one. _fail formats hints with {id}: braces from the file's text (a column
    name, a value) are escaped."""
    return error.hint.replace("{", "{{").replace("}", "}}") if error.hint else _HINTS["input"]


class _AskAgain(Exception):
    """A PUT's outcome is still unknown: ask the status check again after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.delay_s = delay_s


class _Park(Exception):
    """The model's key was refused: the job waits, parked, until the model is resumed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Stopped(Exception):
    """Packaging was cancelled because the daemon is stopping."""


class _WaitFor(Exception):
    """Another job is sending the same content right now."""


class _WindowClosed(Exception):
    """No new upload starts while the upload window is closed."""


class _Failed(Exception):
    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


class Runner:
    """Runs jobs. Holds no job state of its own except the in-memory upload URLs, which are never persisted."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        client: Client,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        window: UploadWindow | None = None,
    ) -> None:
        self.settings = settings
        self.window = window
        self.metrics = metrics or Metrics()
        self.ledger = ledger
        self.client = client
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._tickets: dict[int, UploadTicket] = {}
        self.progress = ProgressReporter(ledger, lambda: self.settings.logging.progress_s, monotonic=monotonic)
        # Told of each job the moment it is recorded `uploaded` (the tracker's track): before its files are moved,
        # which may be in a thread, during which a full read of the ledger would find it unscheduled.
        self.on_uploaded: Callable[[Job], None] | None = None
        # Jobs whose PUT outcome is unknown: since when this process knows (monotonic), and how often it asked.
        self._unknown_since: dict[int, float] = {}
        self._settle_failures: dict[int, int] = {}
        self._waits: dict[int, int] = {}  # job id -> times it waited for the same content in another job
        # Set on shutdown: a job finishes the step it is in, and starts no new one (no new remote job, no new PUT);
        # packaging, which can take minutes for a large pair, is stopped at its next chunk.
        self._cancel = threading.Event()
        # Checks and zips are Python work that holds the GIL: run in threads side by side they gain little and starve
        # the event loop, which must win the GIL back after every syscall (found by review: four Shift_JIS checks at
        # once held it 375 ms; one at a time ~100 ms). One lane for large sources, one for the rest: a small file is
        # never kept waiting behind a gigabyte being zipped, and at most two check threads run.
        self._checking = {large: asyncio.Semaphore(1) for large in (False, True)}

    @property
    def stopping(self) -> bool:
        return self._cancel.is_set()

    @stopping.setter
    def stopping(self, value: bool) -> None:
        if value:
            self._cancel.set()
        else:
            self._cancel.clear()

    async def process(self, job_id: int, model: ModelContext, job: Job | None = None) -> Outcome:
        """Advance the job as far as it can go now (``job``: its row as just read, if the caller has it)."""
        if job is None or job.id != job_id:
            job = self.ledger.get(job_id)
        while True:
            if job.state.terminal:
                await self._close(job, model)
                return Closed(job.state)
            if self.stopping:
                return RetryLater(0.0)  # resumes from the ledger at the next start
            if job.state in (State.REQUESTING, State.UPLOADING) and model.paused_reason is not None:
                return Parked(model.paused_reason)
            try:
                job = await self._step(job, model)
            except _Failed as e:
                job = self._fail(job, e.reason, e.hint)
            except _WaitFor:
                if model.paused_reason is not None:
                    return Parked(model.paused_reason)  # the job it waits for is parked too
                waits = self._waits.get(job.id, 0) + 1
                self._waits[job.id] = waits
                retry = self.settings.retry
                delay = backoff_delay(waits, base_s=retry.base_delay_s, max_s=retry.max_delay_s, rng=self._rng)
                return RetryLater(delay)
            except _Stopped:
                return RetryLater(0.0)  # still `packaging` in the ledger: packaged again at the next start
            except _AskAgain as e:
                return RetryLater(e.delay_s)  # never failed by attempts: a failed job plus `retry` could pay twice
            except _Park as e:
                return Parked(e.reason)
            except _WindowClosed:
                return WaitForWindow()
            except Exception as e:
                outcome, job = self._on_error(job, e)
                if outcome is not None:
                    return outcome

    async def _step(self, job: Job, model: ModelContext) -> Job:
        if job.state in (State.QUEUED, State.PACKAGING):
            return await self._package(job, model)
        if job.state is State.REQUESTING:
            job = await self._request(job, model)
            return await self._upload(job, model, fresh=True)
        return await self._upload(job, model)

    # -- steps --------------------------------------------------------------------------------------------------------
    async def _package(self, job: Job, model: ModelContext) -> Job:
        if job.content_sha256 and self._packaged_still_valid(job, model):
            return self._claim(job, model)  # waited for the same content in another job: no need to zip it again
        if job.package_path:
            await asyncio.to_thread(drop_staged, job)
        started = self._monotonic()
        # What is checked here is what will be moved out of the inbox when the job closes, and nothing else.
        before = source_identities(model.inbox, job.sources)
        # A zip is never small: its few KB may hold what takes seconds to inflate and check.
        small = job.kind != "zip" and _total_size(before) <= _INLINE_BYTES
        # A queued job's move to `packaging` is committed with the packaging's result (one commit, not two) when the
        # check is quick; a large one shows `packaging` while it is checked. Either way a kill -9 finds the job
        # queued or packaging, and both are packaged again from the start; any other end of this step commits it.
        deferred = job.state is not State.PACKAGING
        if deferred and not small:
            job = self._enter_packaging(job)
            deferred = False
        rules = self._rules(job, model)
        try:
            try:
                # A small file is checked inline: a thread hop costs more than checking a few KB.
                if small:
                    pkg = self._build(job, model, rules)
                else:
                    async with self._checking[_total_size(before) > _LARGE_BYTES]:
                        pkg = await asyncio.to_thread(self._build, job, model, rules)
                after = source_identities(model.inbox, job.sources)
            except packager.Cancelled:
                log.info("job.packaging_stopped", model=model.name, job_id=job.id, file=job.upload_filename)
                raise _Stopped from None
            except checks.InputError as e:
                self.ledger.update(job.id, source_ids=before)
                raise _Failed(str(e), _input_hint(e)) from e
            except FileNotFoundError as e:
                self.ledger.update(job.id, source_ids=before)
                name = Path(e.filename or "?").name
                reason = f"a source file disappeared from the inbox before it was uploaded ({name})"
                raise _Failed(reason, _HINTS["input"]) from e
            if before != after:
                if pkg.temporary:
                    pkg.path.unlink(missing_ok=True)
                raise SourceChanged(f"{', '.join(job.sources)} changed while being checked")
        except BaseException:
            if deferred:
                self._enter_packaging(job)
            raise
        # Packaged and claimed in one commit: the claim only reads the ledger, and a kill -9 before it finds the job
        # queued (packaged again) as it found it packaged-but-unclaimed before (claimed at the next start). Not flushed
        # (durable=False): lost to a power cut, the job is packaged and claimed again; nothing was sent yet.
        with self.ledger.batch(durable=False):
            if deferred:  # its event first, as if committed apart; the state itself is set by the update below
                self.ledger.event(job.id, "state", {"state": "packaging"})
            packaging: dict[str, Any] = {"state": State.PACKAGING} if deferred else {}
            job = self.ledger.update(
                job.id,
                **packaging,
                sha256=pkg.sha256,
                content_sha256=pkg.content_sha256,
                size_bytes=pkg.size_bytes,
                package_path=str(pkg.path) if pkg.temporary else None,
                source_ids=after,
                header=pkg.header,
                event="packaged",
                detail={"sha256": pkg.sha256, "size_bytes": pkg.size_bytes, "sources": after,
                        **({"warnings": list(pkg.warnings)} if pkg.warnings else {}),
                        **({"removed_entries": list(pkg.removed_entries)} if pkg.removed_entries else {})},
            )
            claimed = self._claim_content(job, model)
        if not pkg.checked:
            log.info("job.hashed", model=model.name, job_id=job.id, file=job.upload_filename,
                     action="checked while it is sent; its last byte waits for the check")
        if pkg.warnings or pkg.removed_entries:
            log.warning("job.check_warnings", model=model.name, job_id=job.id, file=job.upload_filename,
                        warnings=list(pkg.warnings), removed_entries=list(pkg.removed_entries))
        log.info(
            "job.packaged",
            model=model.name,
            job_id=job.id,
            file=job.upload_filename,
            size_bytes=pkg.size_bytes,
            sha256=pkg.sha256,
            duration_s=round(self._monotonic() - started, 3),
        )
        if isinstance(claimed, _WaitFor):
            raise claimed
        return claimed

    def _enter_packaging(self, job: Job) -> Job:
        return self.ledger.update(job.id, state=State.PACKAGING, event="state", detail={"state": "packaging"})

    def _claim(self, job: Job, model: ModelContext) -> Job:
        claimed = self._claim_content(job, model)
        if isinstance(claimed, _WaitFor):
            raise claimed
        return claimed

    def _claim_content(self, job: Job, model: ModelContext) -> Job | _WaitFor:
        """The job moved on by its claim (requesting, or a duplicate), or the wait to raise once its commit is made:
        ledger writes only, so it may run inside a batch."""
        assert job.content_sha256 is not None
        claim = self.ledger.claim_content(job.id, model.name, job.content_sha256, inbox=job.inbox)
        if isinstance(claim, Job):
            self._waits.pop(job.id, None)
            return claim
        earlier, in_flight = claim
        if in_flight:
            # The same content is being sent by another job, which may still fail: decide once it has ended.
            log.info(
                "job.waiting_for_same_content",
                model=model.name,
                job_id=job.id,
                file=job.upload_filename,
                same_as=earlier,
            )
            return _WaitFor(earlier)
        self._waits.pop(job.id, None)
        log.info("job.duplicate", model=model.name, job_id=job.id, file=job.upload_filename, same_as=earlier)
        return self.ledger.update(
            job.id,
            state=State.DUPLICATE,
            error=f"same content as job {earlier}; not uploaded again",
            event="duplicate",
            detail={"same_as": earlier},
        )

    def _build(self, job: Job, model: ModelContext, rules: Rules) -> packager.Package:
        paths = [model.inbox / name for name in job.sources]
        if job.kind == "csv" and _size(paths[0]) >= max(1, self.settings.packaging.stream_check_min_bytes):
            hashed = packager.hash_csv(paths[0], cancel=self._cancel)  # checked while it is sent: one pass
            if hashed is not None:
                return hashed
            # Not UTF-8 (cp932, say): checked in full now, so the PUT never waits on a second reading.
        return build_package(job.kind, job.name, paths, self.settings, rules, job_id=job.id, cancel=self._cancel)


    async def _request(self, job: Job, model: ModelContext) -> Job:
        self._check_window()  # before the URL: it would only age while the job waits
        ticket = await self.client.request_upload(model.api_key, job.upload_filename)
        self._tickets[job.id] = ticket
        previous = job.retrain_job_id
        # Not flushed (durable=False): lost to a power cut, the restart asks for another URL (as after a kill -9 here);
        # the commit of put_started, durable, flushes this one before any byte is sent.
        job = self.ledger.update(
            job.id,
            retrain_job_id=ticket.retrain_job_id,
            status_before_put=None,
            put_started=0,
            event="upload_url",
            detail={"retrain_job_id": ticket.retrain_job_id, "abandoned": previous},
            durable=False,
        )
        log.info(
            "upload.url_received",
            model=model.name,
            job_id=job.id,
            file=job.upload_filename,
            retrain_job_id=ticket.retrain_job_id,
            abandoned_retrain_job_id=previous,
        )
        # The status now is the baseline that tells, after a lost PUT response, whether the upload arrived.
        before: str | None
        try:
            before = (await self.client.get_status(model.api_key, ticket.retrain_job_id)).status
        except (TransportError, ApiError) as e:
            before = None
            log.warning(
                "upload.baseline_unavailable",
                model=model.name,
                job_id=job.id,
                file=job.upload_filename,
                retrain_job_id=ticket.retrain_job_id,
                error=str(e),
            )
        # Not committed here: the move to `uploading` is committed with put_started, just before the first byte.
        return dataclasses.replace(job, state=State.UPLOADING, status_before_put=before)

    def _uploading(self, job: Job) -> dict[str, Any]:
        """The ledger changes of the move to `uploading` with its baseline (see ``_upload``)."""
        before = job.status_before_put
        return {"state": State.UPLOADING, "status_before_put": before, "event": "state",
                "detail": {"state": "uploading", "status_before_put": before}}

    async def _upload(self, job: Job, model: ModelContext, *, fresh: bool = False) -> Job:
        """The PUT. ``fresh``: ``job`` comes straight from ``_request``, its move to `uploading` not yet committed.

        That move is committed together with put_started (one commit, not two). A kill -9 before that commit finds
        the job `requesting`, with the remote job of its URL recorded: it asks for a new URL, as it did when it found
        the job `uploading` without a PUT started (the URL is never stored). If no PUT starts now, the move is
        committed alone, as before, and the job goes on from `uploading`.
        """
        if fresh and (self.stopping or model.paused_reason is not None or job.status_before_put is None):
            return self.ledger.update(job.id, **self._uploading(job))
        if job.put_started:
            job = await self._settle(job, model)
            if job.state is not State.UPLOADING:
                return job
        ticket = self._tickets.get(job.id)
        if ticket is None or ticket.retrain_job_id != job.retrain_job_id:
            # The URL is never stored: after a restart (or a rejected URL) a fresh one is needed.
            return self.ledger.update(
                job.id,
                state=State.REQUESTING,
                put_started=0,
                event="state",
                detail={"state": "requesting", "why": "no usable upload URL"},
            )
        if job.status_before_put is None:
            # Without a baseline a lost PUT answer could not be settled: no PUT before there is one. A failing check
            # is retried like any step (nothing was sent yet, so giving up after max_attempts costs nothing).
            try:
                before = (await self.client.get_status(model.api_key, ticket.retrain_job_id)).status
            except ApiError as e:
                if isinstance(read_answer(e), KeyRefused):
                    raise  # the model is paused
                # Nothing was sent yet: any other answer (a job created a moment ago and not listed yet, a gateway's
                # HTML page) is asked again like a 5xx, up to max_attempts, rather than failing a good file.
                raise TransportError("status", f"no usable status before the upload ({e.describe()})") from e
            job = self.ledger.update(job.id, status_before_put=before, event="baseline", detail={"status": before})
        try:
            self._check_window()
            self._check_sources_unchanged(job, model)
            path = self._package_path(job, model)
            check = self._sent_check(job, model, path)
        except BaseException:
            if fresh:
                self.ledger.update(job.id, **self._uploading(job))
            raise
        changes = self._uploading(job) if fresh else {}
        job = self.ledger.update(job.id, put_started=1, bytes_sent=0, **changes)  # committed before the first byte
        started = self._monotonic()
        log.info("upload.started", **job.log_fields(), size_bytes=job.size_bytes, attempt=job.attempts + 1)
        meter = UploadMeter()
        try:
            async with self.progress.watching(job, meter):
                size, sha256 = job.size_bytes or 0, job.sha256 or ""
                await self.client.put_file(
                    ticket.upload_url, path, size=size, sha256=sha256, meter=meter, check=check
                )
        except checks.InputError as e:
            # The check, run on the bytes as they were sent, failed: the PUT was cut before its last byte, so the
            # storage holds nothing and no retraining starts. The job fails as a check before the upload does.
            self._tickets.pop(job.id, None)
            self.ledger.update(job.id, state=State.PACKAGING, put_started=0, event="check_failed",
                               detail={"sent": meter.sent, "size_bytes": job.size_bytes})
            raise _Failed(str(e), _input_hint(e)) from e
        except UploadCut as e:
            # Cut before its last byte: nothing arrived. A fresh URL (and remote job) once the window opens.
            self._tickets.pop(job.id, None)
            self.ledger.update(
                job.id,
                state=State.REQUESTING,
                put_started=0,
                event="window_closed",
                detail={"sent": e.sent, "size_bytes": job.size_bytes},
            )
            log.info("upload.cut_window_closed", **job.log_fields(), sent=e.sent, size_bytes=job.size_bytes)
            raise _WindowClosed from e
        except SourceChanged:
            self.ledger.update(job.id, put_started=0)  # we cut the body short: this PUT did not complete
            raise
        except (ApiError, TransportError) as e:
            # A 4xx, or any failure before the last byte left: the storage holds no object. A 5xx (or no answer)
            # after the whole body may come from a gateway in front of a storage that kept it: settle by status.
            definite = isinstance(e, ApiError) and e.http_status < 500
            if definite or not e.body_complete:
                self.ledger.update(job.id, put_started=0)
                raise
            self._unknown_since[job.id] = self._monotonic()
            self.ledger.update(
                job.id,
                outcome_unknown_since=self.ledger.now(),
                event="outcome_unknown",
                detail={"error": scrub(str(e))},
            )
            raise
        finally:
            if check is not None and check.result is not None:
                self._checked(job, model, check.result)  # the check passed: the PUT's last byte could leave
        return self._uploaded(job, model, duration_s=self._monotonic() - started)

    def _rules(self, job: Job, model: ModelContext) -> Rules:
        """The model's rules, with its reference header (``header_file``, else its last finished upload's)."""
        try:
            return model_rules(model.settings, self.ledger.reference_header(model.name, job.inbox))
        except ValueError as e:  # header_file unreadable: the config's fault, not the file's
            raise _Failed(str(e), "Fix `header_file` in the config, then `retrain-uploader retry {id}`.") from e

    def _sent_check(self, job: Job, model: ModelContext, path: Path) -> StreamCheck[checks.CsvReport] | None:
        """For a CSV only hashed at packaging: the check to run on its bytes as the PUT sends them."""
        if job.kind != "csv" or job.header is not None:
            return None
        rules = self._rules(job, model)
        name = job.sources[0]
        return StreamCheck(functools.partial(packager.check_sent_csv, name=name, rules=rules),
                           path=path, sha256=job.sha256 or "")

    def _checked(self, job: Job, model: ModelContext, report: checks.CsvReport) -> None:
        """What the packaging step records for a CSV checked before sending, recorded once its check passed."""
        self.ledger.update(job.id, header=report.header, event="checked",
                           detail={"rows": report.rows, **({"warnings": list(report.warnings)} if report.warnings
                                                            else {})})
        if report.warnings:
            log.warning("job.check_warnings", model=model.name, job_id=job.id, file=job.upload_filename,
                        warnings=list(report.warnings), removed_entries=[])

    async def _settle(self, job: Job, model: ModelContext) -> Job:
        """A PUT of this job was started and its answer never came: ask the status check what became of it.

        The decision is :func:`outcome.decide`; this method only gathers its inputs and carries out its verdict.
        """
        retrain_job_id = job.retrain_job_id
        assert retrain_job_id is not None
        first_seen = self._unknown_since.setdefault(job.id, self._monotonic())  # after a restart: from now on
        if job.outcome_unknown_since is None:
            job = self.ledger.update(job.id, outcome_unknown_since=self.ledger.now())
        result: JobStatus | BaseException
        try:
            result = await self.client.get_status(model.api_key, retrain_job_id)
        except Exception as e:  # any failure at all is "no answer", never "not arrived"
            result = e
        verdict = decide(
            baseline=job.status_before_put,
            answer=read_answer(result),
            since_put_s=self._monotonic() - first_seen,
            wait_s=self.settings.retry.unknown_outcome_wait_s,
        )
        if isinstance(verdict, Arrived):
            return self._uploaded(job, model, confirmed_by_status=True)
        if isinstance(verdict, NotArrived):
            log.info("upload.not_arrived", **job.log_fields(), status=verdict.status)
            self._forget(job.id)  # and so a fresh URL: the node behind the old one may be the one that failed
            return self.ledger.update(
                job.id,
                state=State.REQUESTING,
                put_started=0,
                outcome_unknown_since=None,
                event="not_arrived",
                detail={"status": verdict.status, "status_before_put": job.status_before_put},
            )
        if isinstance(verdict, PauseModel):
            raise _Park(verdict.reason)
        if isinstance(verdict, RemoteJobGone):
            reason = f"the remote job {job.retrain_job_id} disappeared after an upload whose answer was lost"
            raise _Failed(f"{reason}: {verdict.reason}", _HINTS["gone"])
        failures = self._settle_failures.get(job.id, 0) + 1
        self._settle_failures[job.id] = failures
        delay = max(
            verdict.after_s,
            backoff_delay(
                failures,
                base_s=self.settings.retry.base_delay_s,
                max_s=self.settings.retry.max_delay_s,
                retry_after=verdict.retry_after,
                rng=self._rng,
            ),
        )
        log.warning(
            "upload.outcome_unknown",
            **job.log_fields(),
            error=scrub(verdict.reason),
            attempt=failures,
            retry_in_s=round(delay, 3),
            action="asking the status check again; not uploading again until it answers",
        )
        raise _AskAgain(delay)

    def _forget(self, job_id: int) -> None:
        """Drop what this process holds about a job's upload: its URL and its unknown-outcome bookkeeping."""
        for table in (self._tickets, self._unknown_since, self._settle_failures, self._waits):
            table.pop(job_id, None)

    def _uploaded(
        self, job: Job, model: ModelContext, *, duration_s: float | None = None, confirmed_by_status: bool = False
    ) -> Job:
        self._forget(job.id)
        # The moves out of the inbox are planned now and recorded with the upload and the model's last success: one
        # commit for what were three. Nothing outside the ledger happens between them (the renames come after this
        # commit, as closing requires), so a kill -9 finds either the PUT unrecorded (settled by status, as before)
        # or all three; a plan that cannot be made now (done/ unusable) is made when the job closes, as before.
        planned: dict[str, Any] = {}
        if not job.moved_to:
            with contextlib.suppress(OSError):
                planned["moved_to"] = plan_moves(model.inbox, job.sources, DONE_DIR, job_id=job.id)
        with self.ledger.batch():
            job = self.ledger.update(
                job.id,
                state=State.UPLOADED,
                uploaded_at=self.ledger.now(),
                put_started=0,
                bytes_sent=job.size_bytes,
                outcome_unknown_since=None,
                error=None,
                event="uploaded",
                detail={"confirmed_by_status": confirmed_by_status},
                **planned,
            )
            self.ledger.note_model(model.name, success=True)
        if self.on_uploaded is not None:
            self.on_uploaded(job)  # no await since the commit: the tracker schedules it before anything else reads it
        self.metrics.uploaded(model.name, job.size_bytes or 0, duration_s)
        log.info(
            "upload.finished",
            model=model.name,
            job_id=job.id,
            retrain_job_id=job.retrain_job_id,
            file=job.upload_filename,
            size_bytes=job.size_bytes,
            duration_s=None if duration_s is None else round(duration_s, 3),
            confirmed_by_status=confirmed_by_status,
        )
        return job

    # -- errors -------------------------------------------------------------------------------------------------------
    def _on_error(self, job: Job, error: Exception) -> tuple[Outcome | None, Job]:
        job = self.ledger.get(job.id)  # the step may have changed it (put_started) before it raised
        verdict = classify(error)
        reason = scrub(verdict.reason)
        self.ledger.note_model(job.model, error=reason)
        if isinstance(verdict, Pause):
            job = self.ledger.update(job.id, error=reason, event="paused", detail={"error": reason})
            return Parked(reason), job
        attempts = job.attempts + 1
        limit = self.settings.retry.max_attempts
        if isinstance(verdict, Fail):
            return None, self._fail(job, reason, _HINTS["api"])
        # A PUT whose outcome is unknown may have started a paid retraining: failing the job (and a later `retry`)
        # could pay twice, so it is settled through the status check however long that takes, never given up.
        if attempts >= limit and not job.put_started:
            return None, self._fail(job, f"gave up after {attempts} attempts; last error: {reason}", _HINTS["gave_up"])
        if isinstance(verdict, RenewUrl):
            self._tickets.pop(job.id, None)
            log.warning(
                "upload.url_rejected",
                **job.log_fields(),
                error=reason,
                attempt=attempts,
            )
            job = self.ledger.update(
                job.id,
                state=State.REQUESTING,
                put_started=0,
                attempts=attempts,
                error=reason,
                event="url_rejected",
                detail={"error": reason},
            )
            return None, job
        assert isinstance(verdict, Retry)
        changes: dict[str, Any] = {}
        if isinstance(error, SourceChanged):  # the PUT was cut before its last byte: package the file as it is now
            self._tickets.pop(job.id, None)
            changes = {"state": State.PACKAGING, "put_started": 0, "content_sha256": None}
        delay = backoff_delay(
            attempts,
            base_s=self.settings.retry.base_delay_s,
            max_s=self.settings.retry.max_delay_s,
            retry_after=verdict.retry_after,
            rng=self._rng,
        )
        job = self.ledger.update(
            job.id,
            attempts=attempts,
            error=reason,
            event="retry",
            **changes,
            detail={"error": reason, "delay_s": round(delay, 3), "attempt": attempts},
        )
        log.warning(
            "upload.retry_scheduled",
            **job.log_fields(),
            state=str(job.state),
            attempt=attempts,
            delay_s=round(delay, 3),
            error=reason,
        )
        self.metrics.retry(job.model, str(job.state))
        return RetryLater(delay), job

    def _fail(self, job: Job, reason: str, hint: str) -> Job:
        job = self.ledger.get(job.id)  # the state it really failed in (the step may have moved it on)
        reason = scrub(reason)
        log.error(
            "job.failed",
            **job.log_fields(),
            state=str(job.state),
            error=reason,
        )
        self._forget(job.id)
        return self.ledger.update(
            job.id,
            state=State.FAILED,
            error=reason,
            put_started=0,
            event="failed",
            detail={"error": reason, "at_state": str(job.state), "hint": hint.format(id=job.id)},
        )

    # -- closing ------------------------------------------------------------------------------------------------------
    async def _close(self, job: Job, model: ModelContext) -> None:
        # Deleting a staging zip of hundreds of MB takes tens of ms: not on the event loop.
        await close_job_off_loop(self.ledger, job, model.inbox)

    def reject(self, model: ModelContext, name: str, reason: str) -> Job:
        """A file that can never be a job (symlink, FIFO, unsupported name): record it as failed and move it.

        A name that is not UTF-8 cannot be stored (SQLite text is UTF-8): the job records it with ``\\xff`` escapes
        and the entry, moved by its real name, becomes ``failed/jobN.dropped``.
        """
        shown = printable_name(name)
        # Created, identified and failed in one commit: a kill -9 finds no job (the entry is rejected again at the next
        # scan) or a failed one to close, never a `queued` reject that a restart would try to package.
        with self.ledger.batch():
            job = self.ledger.create_job(
                model=model.name,
                kind="reject",
                name=shown,
                sources=[shown],
                upload_filename=shown,
                inbox=inbox_key(model.inbox),
            )
            # Its identity: if its close must wait (a full disk, a read-only inbox) and the entry is replaced
            # meanwhile, the new one is not moved out as this one. A name that is not UTF-8 is recorded as shown;
            # closing finds the entry by that and by this identity (closer.on_disk_name).
            ident = source_identities(model.inbox, [name])
            self.ledger.update(job.id, source_ids={shown: ident[name]} if name in ident else {})
            if shown == name:
                job = self._fail(job, f"{name!r} was not taken: {reason}", _HINTS["reject"])
            else:
                hint = f"Give it a UTF-8 name and drop it again: it is failed/job{job.id}.dropped now."
                job = self._fail(job, f"'{shown}' was not taken: {reason}", hint)  # repr() would double backslashes
        try:
            if shown != name:
                targets = plan_moves(model.inbox, [name], FAILED_DIR, job_id=job.id, error_stem=shown)
                job = self.ledger.update(job.id, moved_to=targets)
            return close_job(self.ledger, job, model.inbox)  # nothing staged for a reject
        except OSError as e:
            # A full disk, say: the job is recorded (failed, not closed); the caller closes it again later.
            log.warning("job.close_failed", **job.log_fields(), error=str(e), action="closing it again later")
            return self.ledger.get(job.id)

    def _packaged_still_valid(self, job: Job, model: ModelContext) -> bool:
        if job.package_path and not Path(job.package_path).exists():
            return False
        try:
            self._check_sources_unchanged(job, model)
        except SourceChanged:
            return False
        return True

    def _check_sources_unchanged(self, job: Job, model: ModelContext) -> None:
        """A pair's zip was built from its sources: if they changed since, build it again (the zip's own digest,
        checked while streaming, cannot see that). A CSV replaced under its name is packaged again too."""
        if job.source_ids is None:
            return  # packaged by a version before schema 3
        if source_identities(model.inbox, job.sources) != job.source_ids:
            raise SourceChanged(f"{', '.join(job.sources)} changed after being checked")

    def _check_window(self) -> None:
        if self.window is not None and not self.window.is_open:
            raise _WindowClosed

    def _package_path(self, job: Job, model: ModelContext) -> Path:
        return Path(job.package_path) if job.package_path else model.inbox / job.sources[0]


# Up to this many bytes of sources, a job's check runs on the event loop (a thread hop costs more than checking a few
# KB) and its close's renames too. Small enough that the slowest check there is stays short: 256 KiB of plain UTF-8
# take ~0.6 ms, but of Shift_JIS ~115 ms (found by review: 4 workers held the loop 375 ms), i.e. 8 KiB ~4 ms.
_INLINE_BYTES = 8 * 1024
_LARGE_BYTES = 8 * 1024 * 1024  # sources beyond this are checked in the large lane (Runner._checking)


def _total_size(identities: Mapping[str, list[int]]) -> int:
    """The sources' total size from their identities (``[dev, ino, size, ...]``; a missing one counts 0)."""
    return sum(ident[2] for ident in identities.values() if len(ident) > 2)


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0  # the full check reports it


def build_package(
    kind: str, name: str, paths: list[Path], settings: Settings, rules: Rules, *, job_id: int,
    cancel: threading.Event | None = None, staging_dir: Path | None = None,
) -> packager.Package:
    """Check and package a job's sources exactly as the daemon does (``staging_dir`` defaults to the configured one;
    ``run --dry-run`` and ``check`` pass a temporary folder)."""
    limits = settings.packaging
    staging = staging_dir or settings.staging_dir
    if kind == "csv":
        return packager.package_csv(paths[0], cancel=cancel, rules=rules)
    staging.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        return packager.package_zip(
            paths[0],
            max_ratio=limits.max_zip_ratio,
            max_uncompressed_bytes=limits.max_uncompressed_bytes,
            cancel=cancel,
            rules=rules,
            staging_dir=staging,
            job_id=job_id,
            level=limits.zip_level,
        )
    return packager.package_pair(
        name,
        paths[0],
        paths[1],
        staging,
        job_id=job_id,
        level=limits.zip_level,
        cancel=cancel,
        rules=rules,
    )
