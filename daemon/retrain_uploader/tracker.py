"""Follows each uploaded job to its end: Retrain Status Check until ``job_finished``, the result download,
and (where the model wants it) the Model Switch.

One status request per job per interval, however many jobs wait; a job whose checks fail backs off on its own.
Everything the tracker learns is in the ledger, so polling resumes after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import random
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

import structlog

from .client import ApiError, Client, JobStatus, ResultTooLarge, TransportError
from .config import Settings
from .ledger import Job, Ledger, StaleJob, State, TrackedRow
from .mover import plan_result_name, rename_no_replace, result_part, same_file
from .outcome import FINISHED_STATUS, Gone, interpret, read_answer
from .policy import Pause, backoff_delay, classify
from .redact import scrub
from .runner import ModelContext, context_for

__all__ = [
    "FINISHED_STATUS",
    "NOT_FINISHED_MESSAGE",
    "RetrainTracker",
    "first_check_s",
    "interpret",
    "poll_interval",
]

log = structlog.get_logger("retrain_uploader.tracker")

NOT_FINISHED_MESSAGE = "Retrain job is not finished."
_AGE_FRACTION = 0.1  # a job is checked about ten times over any stretch of its life, once past the first interval
_PERSIST_S = 600.0  # watched time is written to the ledger in steps this big (a crash forgets at most one step)
_DOWNLOADS = 2  # result downloads at once, beside the polls
# Phases of the first checks after a full read: n times the golden ratio, modulo 1. Any run of consecutive jobs (and so
# jobs of about the same age, which have about the same interval) lands evenly over [0, 1), whatever the run's length.
_GOLDEN = (5**0.5 - 1) / 2
_JITTER = 0.1  # each interval is drawn from interval x U(1 - _JITTER, 1 + _JITTER), so checks never line up


def poll_interval(age_s: float, *, poll_s: float, max_poll_s: float) -> float:
    """Seconds to the next regular check of a job uploaded ``age_s`` ago: ``poll_s`` at first, then a tenth of its
    age, never more than ``max_poll_s`` (nor less than ``poll_s``)."""
    return max(poll_s, min(max_poll_s, _AGE_FRACTION * age_s))


def first_check_s(phase: float, interval_s: float) -> float:
    """Seconds to the first check of a job scheduled at ``phase`` (in [0, 1)) of its ``interval_s``.

    Later checks come every ``interval_s`` x U(0.9, 1.1). Were the first ones ``phase x interval_s``, the first round
    would still be running when the second, jittered one begins: 1.5x the steady rate just before ``interval_s``,
    0.5x just after. The first checks are instead spread as the checks of a long-running job fall in time (the
    stationary distribution of that renewal): flat up to 0.9 x ``interval_s``, then thinning linearly to nothing at
    1.1 x, which the second round fills exactly. This is the inverse of that distribution's CDF.
    """
    low, width = (1 - _JITTER) * interval_s, 2 * _JITTER * interval_s
    at = phase * interval_s  # the mean interval is interval_s
    if at <= low:
        return at
    return low + width - math.sqrt(max(0.0, width * width - 2 * width * (at - low)))


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class RetrainTracker:
    """Polls the jobs in ``uploaded``, ``retraining`` and ``finished`` (until downloaded and, if wanted, switched)."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        client: Client,
        models: Mapping[str, ModelContext],
        *,
        on_pause: Callable[[ModelContext, str], None],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.client = client
        self.models = models
        self._on_pause = on_pause
        self._clock = clock
        self._monotonic = monotonic
        self._next: dict[int, float] = {}  # job id -> monotonic time of its next check
        self._heap: list[tuple[float, int]] = []  # the same, ordered; entries that no longer match are skipped
        self._inflight: set[int] = set()
        self._random = rng or random.Random()  # jitter, not a secret
        self._failures: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._full = True
        self._next_full = 0.0
        # Watched time (see _watch): per job, seconds of real answers, the monotonic time of the last answer, and the
        # part not yet written to the ledger (written every _PERSIST_S of it, and at the end).
        self._watched: dict[int, float] = {}
        self._last_answer: dict[int, float] = {}
        self._unsaved: dict[int, float] = {}
        self._downloads: dict[int, asyncio.Task[None]] = {}
        self._download_failures: dict[int, int] = {}
        self._result_names: set[Path] = set()  # result files being downloaded now
        self._download_slots = asyncio.Semaphore(_DOWNLOADS)

    def track(self, job: Job) -> None:
        """Follow a job just uploaded: its first check one interval from now (``poll_s`` with jitter), like every
        later one. Not at once: a backlog uploading dozens of files a second would double the status requests of the
        drain (one request per job per interval, as everywhere else). Called as the upload is recorded (the runner's
        on_uploaded), with no await in between: were it told once the files were moved (in a thread for a pair or a
        large file), a full read meanwhile would give the job a restart's first phase, often at once."""
        if job.id not in self._next and job.id not in self._inflight:
            self._schedule(job.id, self._monotonic() + self._interval(job))
            self._wake.set()  # the loop may sleep past this job's time

    def poke(self) -> None:
        """Read the tracked jobs again now (a model resumed): those not scheduled are spread over their interval."""
        self._full = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Check each job when it is due, at most ``max_concurrent_polls`` at a time, until ``stop``."""
        size = self.settings.status.max_concurrent_polls
        queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=size)
        workers = {asyncio.create_task(self._worker(queue), name=f"retrain-poll-{n}") for n in range(size)}
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.poll_once(queue)
                except Exception:  # the ledger, say: log it and poll again next interval, never stop following jobs
                    log.exception("retrain.poll_failed")
                if self._wake.is_set() or stop.is_set():
                    continue  # woken while handing jobs over (a job uploaded meanwhile): no wait to set up
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait(
                        {waiter, stopper}, timeout=self._sleep_s(), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                    stopper.cancel()
        finally:
            for task in [*workers, *self._downloads.values()]:
                task.cancel()
            await asyncio.gather(*workers, *self._downloads.values(), return_exceptions=True)

    def _sleep_s(self) -> float:
        while self._heap and self._next.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # a schedule since replaced or dropped
        wake_at = min(self._next_full, self._heap[0][0]) if self._heap else self._next_full
        return max(0.0, wake_at - self._monotonic())

    def _schedule(self, job_id: int, at: float) -> None:
        self._next[job_id] = at
        heapq.heappush(self._heap, (at, job_id))

    def _due(self, now: float) -> set[int]:
        due: set[int] = set()
        while self._heap and self._heap[0][0] <= now:
            at, job_id = heapq.heappop(self._heap)
            if self._next.get(job_id) == at:
                del self._next[job_id]
                due.add(job_id)
        return due

    async def poll_once(self, queue: asyncio.Queue[Job]) -> None:
        """Hand the jobs that are due to the poll workers.

        Every ``poll_s`` the ledger is read for the jobs still tracked: those not scheduled yet (at start, or after a
        model resumed) are spread evenly over their interval (``poll_s`` for a young job, up to ``max_poll_s`` for an
        old one), never checked in one burst.
        """
        now = self._monotonic()
        if self._full or now >= self._next_full:
            self._full = False
            self._next_full = now + self.settings.status.poll_s
            self._reschedule(now)
        due = self._due(now) - self._inflight
        if not due:
            return
        found: set[int] = set()
        ids = sorted(due)
        for chunk in range(0, len(ids), 500):  # well under SQLite's limit of bound parameters
            for job in self._tracked(ids[chunk : chunk + 500]):
                found.add(job.id)
                if not self._wanted(job):
                    self._next.pop(job.id, None)  # a paused model: resuming pokes a full poll
                    continue
                self._next.pop(job.id, None)
                self._inflight.add(job.id)
                await queue.put(job)
        for gone in due - found:  # ended, or moved on by the CLI
            self._next.pop(gone, None)
            self._failures.pop(gone, None)

    def _tracked(self, ids: list[int]) -> list[Job]:
        auto = [name for name, ctx in self.models.items() if ctx.settings.auto_switch]
        return self.ledger.tracked(download=self.settings.status.download_result, auto_switch_models=auto, ids=ids)

    def _reschedule(self, now: float) -> None:
        auto = [name for name, ctx in self.models.items() if ctx.settings.auto_switch]
        rows = self.ledger.tracked_rows(download=self.settings.status.download_result, auto_switch_models=auto)
        wanted = [job for job in rows if self._wanted(job)]
        keep = {job.id for job in wanted}
        # Forget schedules of jobs not wanted now (a paused model) or no longer tracked: resuming pokes a full poll.
        self._next = {k: v for k, v in self._next.items() if k in keep}
        self._heap = [(at, k) for k, at in self._next.items()]
        heapq.heapify(self._heap)
        new = [job for job in wanted if job.id not in self._next and job.id not in self._inflight]
        # Each at its own phase of its own interval: a job checked every 10 min by now (max_poll_s) gets its first
        # check somewhere in the next 10 min, not in the next poll_s with all the others. Squeezing them into poll_s
        # made a burst of max_poll_s / poll_s times the steady rate after every restart, repeated every max_poll_s.
        for n, job in enumerate(new):
            self._schedule(job.id, now + first_check_s((n * _GOLDEN) % 1.0, self._regular_s(job)))

    async def _worker(self, queue: asyncio.Queue[Job]) -> None:
        while True:
            job = await queue.get()
            try:
                await self._check(job)
            except Exception:
                log.exception("retrain.check_crashed", model=job.model, job_id=job.id)
            finally:
                self._inflight.discard(job.id)

    def _interval(self, job: Job) -> float:
        """The next regular check of ``job``: its age's interval with 10 % jitter, so checks never line up."""
        return self._regular_s(job) * self._random.uniform(1 - _JITTER, 1 + _JITTER)

    def _regular_s(self, job: Job | TrackedRow) -> float:
        status = self.settings.status
        age = 0.0
        if job.uploaded_at is not None:
            age = self._clock() - _timestamp(job.uploaded_at)
        return poll_interval(age, poll_s=status.poll_s, max_poll_s=status.max_poll_s)

    def _wanted(self, job: Job | TrackedRow) -> bool:
        ctx = context_for(self.models, job)
        if ctx is None or ctx.paused_reason is not None or not job.retrain_job_id:
            return False
        if job.state is State.FINISHED:
            return self._needs_download(job) or ctx.settings.auto_switch
        if job.state is State.SWITCHED:  # switched by hand before its result was fetched
            return self._needs_download(job)
        return True

    def _needs_download(self, job: Job | TrackedRow) -> bool:
        return self.settings.status.download_result and job.result_path is None

    async def _check(self, job: Job) -> None:
        ctx = context_for(self.models, job)
        assert ctx is not None  # _wanted() checked it
        assert job.retrain_job_id is not None
        try:
            # Always ask first: a job that finished while the daemon was down (or its model paused) is finished, not
            # timed out; only a real answer that it is still in progress can end it as retrain_timeout.
            status = await self.client.get_status(ctx.api_key, job.retrain_job_id)
            job = self._record(job, status)
            if job.state in (State.FINISHED, State.SWITCHED):
                await self._finish(job, ctx, status)
            elif self._watch(job) > self.settings.status.give_up_after_h * 3600:
                self._give_up(job)
                return
        except StaleJob:
            return  # someone else (the CLI's switch) moved the job on; nothing to do
        except (ApiError, TransportError, OSError) as e:
            self._on_error(job, ctx, e)
            return
        except Exception as e:
            log.exception("retrain.check_crashed", model=job.model, job_id=job.id)
            self._on_error(job, ctx, e)
            return
        self._failures.pop(job.id, None)
        self._schedule(job.id, self._monotonic() + self._interval(job))

    def _watch(self, job: Job) -> float:
        """Seconds this retraining has been watched: the time between two real answers of this process, each gap
        capped (a daemon that was down, or a model that was paused, does not count), plus what the ledger kept."""
        now = self._monotonic()
        last = self._last_answer.get(job.id)
        self._last_answer[job.id] = now
        status = self.settings.status
        cap = 2 * max(status.max_poll_s, status.max_poll_delay_s, status.poll_s)
        gap = 0.0 if last is None else min(max(now - last, 0.0), cap)
        watched = self._watched.get(job.id, job.watched_s or 0.0) + gap
        self._watched[job.id] = watched
        unsaved = self._unsaved.get(job.id, 0.0) + gap
        if unsaved >= _PERSIST_S:
            self.ledger.update(job.id, watched_s=watched)
            unsaved = 0.0
        self._unsaved[job.id] = unsaved
        return watched

    def _forget(self, job_id: int) -> None:
        for table in (self._watched, self._last_answer, self._unsaved):
            table.pop(job_id, None)

    def _give_up(self, job: Job) -> None:
        hours = self.settings.status.give_up_after_h
        watched = self._watched.get(job.id, 0.0)
        reason = (
            f"still {job.retrain_status!r} after being watched for {watched / 3600:.1f} h (give_up_after_h"
            f" = {hours:g}); check it in the UI, or `retrain-uploader retry {job.id}` to follow it again"
        )
        self.ledger.update(
            job.id,
            state=State.RETRAIN_TIMEOUT,
            error=reason,
            watched_s=watched,
            event="retrain_timeout",
            detail={"last_status": job.retrain_status, "watched_s": round(watched, 1)},
            expect_state=job.state,
        )
        self._forget(job.id)
        log.error(
            "retrain.gave_up",
            **job.log_fields(),
            status=job.retrain_status,
            hours=hours,
        )

    def _record(self, job: Job, status: JobStatus) -> Job:
        state = interpret(status.status)
        if job.state in (State.FINISHED, State.SWITCHED):
            return job  # polled again only for a fresh download URL (or, finished, to switch)
        changed = state is not job.state or status.status != job.retrain_status
        if not changed:
            return job
        message = scrub(status.message) if status.message else None
        job = self.ledger.update(
            job.id,
            state=state,
            retrain_status=status.status,
            retrain_message=message,
            model_id=status.model_id,
            error=message if state is State.RETRAIN_FAILED else None,
            event="retrain_status",
            detail={"status": status.status, "message": message},
            expect_state=job.state,
            # A retraining under way, lost to a power cut, is polled again; an end is flushed (durable).
            durable=state is not State.RETRAINING,
        )
        event = {State.FINISHED: "retrain.finished", State.RETRAIN_FAILED: "retrain.failed"}.get(
            state, "retrain.status"
        )
        logger = log.error if state is State.RETRAIN_FAILED else log.info
        logger(
            event,
            **job.log_fields(),
            status=status.status,
            message=message,
            model_id=status.model_id,
        )
        return job

    async def _finish(self, job: Job, ctx: ModelContext, status: JobStatus) -> None:
        self._forget(job.id)
        if self._needs_download(job) and not status.download_url:
            # download_url is optional in the API's schema: without one there is nothing to fetch, ever.
            job = self._no_result(job, "the finished job has no download_url")
        elif self._needs_download(job) and status.download_url and job.id not in self._downloads:
            # Beside the polls, bounded: a slow result never holds up other jobs' checks, nor this job's switch.
            task = asyncio.create_task(self._download(job, ctx, status.download_url), name=f"result-{job.id}")
            self._downloads[job.id] = task
            task.add_done_callback(lambda _: self._downloads.pop(job.id, None))
        if ctx.settings.auto_switch and job.state is State.FINISHED:
            await self.switch(job, ctx)

    async def _download(self, job: Job, ctx: ModelContext, url: str) -> None:
        async with self._download_slots:
            dest: Path | None = None
            try:
                # Two jobs of one name finishing together: the second takes NAME.jobN.result.zip, never the same
                # name (nor the same hidden part file) as a download under way.
                dest = plan_result_name(ctx.inbox, job.name, job_id=job.id, claimed=self._result_names)
                self._result_names.add(dest)
                part = result_part(dest, job.id)
                size = await self.client.download(
                    url, dest, max_bytes=self.settings.status.max_result_bytes, part=part
                )
                relative = str(dest.relative_to(ctx.inbox))
                # Recorded first, then given its name: a kill -9 in between leaves a recorded part, which the next
                # start gives its name (Service._recover_results). The other order left an unrecorded result, and
                # the next start downloaded a second copy as NAME.jobN.result.zip.
                self.ledger.update(job.id, result_path=relative, event="result_downloaded",
                                   detail={"path": relative, "size_bytes": size})
                try:
                    rename_no_replace(part, dest)
                except OSError:
                    if same_file(part, dest):  # its link made, its unlink failed: it has its name, the part is extra
                        with contextlib.suppress(OSError):
                            part.unlink()
                    else:  # the name taken meanwhile, done/ unwritable: not recorded after all, tried again
                        self.ledger.update(job.id, result_path=None, event="result_not_placed",
                                           detail={"path": relative})
                        part.unlink(missing_ok=True)
                        raise
            except ResultTooLarge as e:
                self._no_result(job, str(e))
                return
            except (ApiError, TransportError, OSError) as e:  # OSError: done/ unusable too (planning the name)
                # Counted apart from the status checks (which succeed meanwhile): the next check starts a new
                # download with a fresh download_url, up to max_attempts, then the result is given up.
                failures = self._download_failures.get(job.id, 0) + 1
                self._download_failures[job.id] = failures
                reason = scrub(str(e))
                if failures >= self.settings.retry.max_attempts:
                    self._no_result(job, f"gave up after {failures} download attempts: {reason}")
                    self._download_failures.pop(job.id, None)
                else:
                    log.warning("retrain.download_failed", **job.log_fields(), error=reason, attempt=failures)
                return
            finally:
                if dest is not None:
                    self._result_names.discard(dest)  # written (then it exists) or given up
            self._download_failures.pop(job.id, None)
            log.info(
                "retrain.result_downloaded",
                model=job.model,
                job_id=job.id,
                file=job.upload_filename,
                path=relative,
                size_bytes=size,
            )

    async def switch(self, job: Job, ctx: ModelContext) -> Job:
        """Retrain Model Switch. "not finished" is not a failure: the caller tries again later."""
        assert job.retrain_job_id is not None
        await self.client.switch_model(ctx.api_key, job.retrain_job_id)
        job = self.ledger.update(
            job.id,
            state=State.SWITCHED,
            switched_at=self.ledger.now(),
            event="switched",
            detail={"retrain_job_id": job.retrain_job_id, "by": "auto_switch"},
            expect_state=State.FINISHED,
        )
        log.info(
            "model.switched",
            **job.log_fields(),
            model_id=job.model_id,
        )
        return job

    def _no_result(self, job: Job, why: str) -> Job:
        """Stop trying to download a result: an empty ``result_path`` means "not available"."""
        log.warning(
            "retrain.result_unavailable",
            **job.log_fields(),
            error=why,
        )
        return self.ledger.update(job.id, result_path="", event="result_unavailable", detail={"error": why})

    def _on_error(self, job: Job, ctx: ModelContext, error: Exception) -> None:
        verdict = classify(error)
        if isinstance(verdict, Pause):
            self._on_pause(ctx, verdict.reason)
            self._schedule(job.id, self._monotonic() + self.settings.status.poll_s)
            return
        failures = self._failures.get(job.id, 0) + 1
        self._failures[job.id] = failures
        reason = scrub(str(error))
        with contextlib.suppress(StaleJob):
            if isinstance(read_answer(error), Gone) and job.state in (State.UPLOADED, State.RETRAINING):
                # Only the documented "Not found retrain job." / "This job may be deleted." end a retraining: a
                # gateway's HTML 404 or a bug of ours is retried with backoff (re-dropping a file whose retraining
                # "failed" would pay again). Only real answers count as watched time for give_up_after_h.
                self.ledger.update(
                    job.id,
                    state=State.RETRAIN_FAILED,
                    error=reason,
                    event="retrain_lost",
                    detail={"error": reason},
                    expect_state=job.state,
                )
                log.error(
                    "retrain.lost",
                    **job.log_fields(),
                    error=reason,
                )
                return
            gave_up = failures >= self.settings.retry.max_attempts
            if job.state in (State.FINISHED, State.SWITCHED) and gave_up and self._needs_download(job):
                self._no_result(job, f"gave up after {failures} attempts: {reason}")
                self._failures.pop(job.id, None)
                return
        status = self.settings.status
        delay = backoff_delay(
            failures, base_s=status.poll_s, max_s=max(status.max_poll_delay_s, status.poll_s), rng=self._random
        )
        if isinstance(error, ApiError) and error.message.strip() == NOT_FINISHED_MESSAGE:
            delay = status.poll_s
        self._schedule(job.id, self._monotonic() + delay)
        log.warning(
            "retrain.check_failed",
            **job.log_fields(),
            state=str(job.state),
            error=reason,
            attempt=failures,
            retry_in_s=round(delay, 3),
        )
        with contextlib.suppress(Exception):
            self.ledger.note_model(job.model, error=reason)
