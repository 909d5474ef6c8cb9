"""The daemon's lifecycle: start-up recovery, watchers, a bounded worker pool, pausing models, shutdown.

Lifecycle: open the ledger (exclusive) → resume every unfinished job → scan the inboxes → run until stopped →
stop taking work, let jobs in flight finish within the grace period, cancel the rest, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import stat
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from . import limits, packager
from .admin import PROBE_JOB_ID, window_text
from .bandwidth import TokenBucket, UploadWindow
from .client import ApiError, Client, TransportError
from .closer import real_name
from .config import ConfigError, ModelSettings, Settings
from .ledger import CHECK_BUDGET_S, DAMAGED_EXIT_STATUS, Job, Ledger, State, check_whole
from .metrics import Metrics, MetricsServer, Snapshot
from .mover import parse_result_part, rename_no_replace, same_file
from .network import PROXY_AUTH_FAILED, Network
from .notify import Notifier
from .policy import backoff_delay, is_credential_error
from .redact import register_secret
from .retention import Retention
from .runner import Closed, ModelContext, Parked, RetryLater, Runner, WaitForWindow, context_for, inbox_key
from .tracker import RetrainTracker
from .watcher import Candidate, InboxWatcher, Reject
from .watchhub import WatchHub

__all__ = ["Service"]

_VACUUM_START_TIMEOUT_S = 3600  # how long systemd waits for the start while the one-off VACUUM runs

log = structlog.get_logger("retrain_uploader.service")

_RECORDING = 0  # the job id of a file taken whose job is not recorded yet (ids start at 1)


class Service:
    """The daemon. ``run()`` returns the process exit code."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: aiohttp.ClientSession | None = None,
        handle_signals: bool = True,
        notifier: Notifier | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        now: Callable[[], datetime] | None = None,
        window_recheck_s: float = 60.0,
        check_budget_s: float = CHECK_BUDGET_S,
    ) -> None:
        self.settings = settings
        self._check_budget_s = check_budget_s  # the integrity check at start, at most this long (the rest after)
        self._now = now or (lambda: datetime.now(UTC))  # the wall clock the upload timetable is read with
        self._window_recheck_s = window_recheck_s
        self._window_waiting: set[int] = set()  # jobs that wait for the upload window to open
        self._session = session
        self._handle_signals = handle_signals
        self._notifier = notifier or Notifier()
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self.stop_event = asyncio.Event()
        self.ready = asyncio.Event()
        self.models: dict[str, ModelContext] = {}
        self._watchers: dict[str, InboxWatcher] = {}
        self._results_recovered: set[str] = set()  # inboxes whose result parts were looked at (once a process)
        self.watch_hub = WatchHub(settings.watch, clock=monotonic)  # one inotify instance for every inbox
        self._watch_stops: dict[str, asyncio.Event] = {}
        self._probes: dict[str, asyncio.TimerHandle] = {}
        # Files held by a job, by (resolved inbox, file name): whatever the model is called now, a held file is never
        # taken a second time; it is free again once its job closed (a file that replaced it then becomes a job).
        self._taken: dict[tuple[str, str], int] = {}
        self._active: set[int] = set()  # queued, waiting for a retry, or being worked on
        self._intake: list[tuple[str, str, Candidate]] = []  # taken, to be recorded in one commit (_record_takes)
        self._queue: asyncio.Queue[int] = asyncio.Queue(maxsize=settings.pool.queue_size)
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._busy = 0
        self._damaged = False  # the ledger was found damaged at run time: stop, exit DAMAGED_EXIT_STATUS
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.ledger: Ledger
        self.window: UploadWindow
        self.runner: Runner
        self.tracker: RetrainTracker
        self.retention = Retention(lambda: self.settings)  # keep_days, done_days: read at each pass

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    async def run(self) -> int:
        network = Network.from_settings(self.settings.api)  # the proxy password and CA bundle, read now
        self.ledger = Ledger(self.settings.ledger.path, lock=True, check_budget_s=self._check_budget_s)
        self.ledger.on_damage = self.ledger_damaged  # whichever write meets it, the daemon stops
        if not self.ledger.checked_fully:  # the rest is checked in a thread once the daemon works (_check_ledger)
            log.info("ledger.check_cut_short", ledger=str(self.settings.ledger.path), budget_s=self._check_budget_s)
        self.window = UploadWindow(
            self.settings.upload.timetable(),
            TokenBucket(),
            abort_on_close=self.settings.upload.on_close == "abort",
            now=self._now,
            recheck_s=self._window_recheck_s,
            on_open=self._window_opened,
        )
        self.window.refresh()
        client = Client(
            self.settings.api.base_url,
            session=self._session,
            connect_timeout_s=self.settings.api.connect_timeout_s,
            request_timeout_s=self.settings.api.request_timeout_s,
            upload_read_timeout_s=self.settings.api.upload_read_timeout_s,
            throttle=self.window.bucket,
            network=network,
        )
        self.runner = Runner(
            self.settings,
            self.ledger,
            client,
            monotonic=self._monotonic,
            rng=self._rng,
            metrics=self.metrics,
            window=self.window,
        )
        self.runner.progress.on_change = self._notify_status
        self.tracker = RetrainTracker(
            self.settings, self.ledger, client, self.models, on_pause=self._pause, monotonic=self._monotonic
        )
        self.runner.on_uploaded = self.tracker.track  # as the upload is recorded, not once its files are moved
        loop = asyncio.get_running_loop()
        if self._handle_signals:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        workers: list[asyncio.Task[None]] = []
        exporter: MetricsServer | None = None
        try:
            # A one-off VACUUM, before anything else writes: systemd is told to wait (it rewrites the whole file).
            await self.retention.prepare(
                lambda: self._notifier.send(f"EXTEND_TIMEOUT_USEC={_VACUUM_START_TIMEOUT_S * 1_000_000}",
                                            "STATUS=compacting the ledger once (keep_days): VACUUM")
            )
            if self.settings.metrics.enabled:
                exporter = MetricsServer(
                    self.metrics,
                    self._metrics_snapshot,
                    health=self._health_snapshot,
                    host=self.settings.metrics.host,
                    port=self.settings.metrics.port,
                )
                await exporter.start()
                self.metrics_port = exporter.port
            for model in self.settings.models:
                self._start_model(model)
            self._recover()
            workers = [
                asyncio.create_task(self._worker(i), name=f"worker-{i}") for i in range(self.settings.pool.workers)
            ]
            self._check_limits()
            for name in list(self._watchers):
                self._run_watcher(name)
            self._spawn(self.watch_hub.run(self.stop_event), "watch-hub")
            self._spawn(self._heartbeat(), "heartbeat")
            self._spawn(self.window.run(self.stop_event), "upload-window")
            self._spawn(self.tracker.run(self.stop_event), "retrain-tracker")
            self._spawn(self.retention.run(self.stop_event), "retention")
            if not self.ledger.checked_fully:
                self._spawn(self._check_ledger(), "ledger-check")
            self.ready.set()
            self._notifier.send("READY=1", f"STATUS={self.summary()}")
            log.info(
                "service.started",
                models=sorted(self.models),
                workers=self.settings.pool.workers,
                ledger=str(self.settings.ledger.path),
            )
            await self.stop_event.wait()
            await self._shutdown(workers)
        finally:
            if self._handle_signals:
                loop.remove_signal_handler(signal.SIGTERM)
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGHUP)
            if exporter is not None:
                await exporter.stop()
            await client.close()
            self.ledger.close()
            self._notifier.close()
        log.info("service.stopped")
        return DAMAGED_EXIT_STATUS if self._damaged else 0

    async def _check_ledger(self) -> None:
        """The integrity check the start cut short, finished in a thread while the daemon works."""
        started = time.monotonic()
        damage = await asyncio.to_thread(check_whole, self.settings.ledger.path)
        if damage is not None:
            self.ledger_damaged(damage)
            return
        log.info("ledger.checked", ledger=str(self.settings.ledger.path), took_s=round(time.monotonic() - started, 3))

    def ledger_damaged(self, error: str | BaseException) -> None:
        """Damage met at run time (the check above, or a write that read a damaged page): said once, like at start,
        and the daemon stops with the status the systemd unit does not restart."""
        if self._damaged:
            return
        self._damaged = True
        log.error("ledger.damaged", error=str(error), action="stopping; restarting will not help")
        self.request_stop()

    def request_stop(self) -> None:
        if not self.stop_event.is_set():
            log.info("service.stopping", in_flight=self._busy, queued=self._queue.qsize())
            self._notifier.send("STOPPING=1")
            self.stop_event.set()
            if hasattr(self, "runner"):
                self.runner.stopping = True
            for event in self._watch_stops.values():
                event.set()

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP). An invalid file is refused and the running config stays.

        New models start, removed ones stop watching (their jobs in flight finish), keys are re-read and paused
        models are tried again at once. ``ledger``, ``pool`` and ``api`` need a restart and keep their values.
        """
        if self.settings.source is None:
            return False
        self._notifier.send("RELOADING=1")
        try:
            new = Settings.from_toml(self.settings.source)
        except ConfigError as e:
            log.error("config.reload_refused", error=str(e), action="keeping the running configuration")
            self._notifier.send("READY=1")
            return False
        try:
            return self._apply(new)
        except Exception:
            # e.g. a new inbox that cannot be created: say so; models already applied keep running
            log.exception("config.reload_failed")
            self._notifier.send("READY=1", f"STATUS={self.summary()}")
            return False

    def _apply(self, new: Settings) -> bool:
        # The way out (proxy, its password file, CAs) is applied now: a model paused by a 407 is tried again at once.
        reloadable = {"proxy": new.api.proxy, "proxy_password_file": new.api.proxy_password_file}
        reloadable["ca_file"] = new.api.ca_file
        try:
            self.runner.client.network = Network.from_settings(new.api)
        except ConfigError as e:
            log.error("config.reload_refused", error=str(e), action="keeping the running configuration")
            self._notifier.send("READY=1", f"STATUS={self.summary()}")
            return False
        fixed = {name: getattr(self.settings, name) for name in ("ledger", "pool", "api")}
        fixed["api"] = self.settings.api.model_copy(update=reloadable)
        fixed["ledger"] = self.settings.ledger.model_copy(update={"keep_days": new.ledger.keep_days})
        changed = sorted(name for name, value in fixed.items() if getattr(new, name) != value)
        if changed:
            log.warning("config.restart_needed", sections=changed, action="these keep their running values")
            new = new.model_copy(update=fixed)
        active = {name for name, stop in self._watch_stops.items() if not stop.is_set()}
        new_names = {m.name for m in new.models}
        self.settings = self.runner.settings = self.tracker.settings = new
        self.watch_hub.apply(new.watch)
        self.window.apply(new.upload.timetable(), abort_on_close=new.upload.on_close == "abort")
        for name in sorted(active - new_names):
            self._watch_stops[name].set()  # its queued and in-flight jobs still finish
            log.info("model.removed", model=name, open_jobs=self._open_jobs(self.models[name].inbox))
        for model in new.models:
            ctx = self.models.get(model.name)
            if ctx is None:
                self._start_model(model)
                self._run_watcher(model.name)
                log.info("model.added", model=model.name, inbox=str(model.inbox))
                continue
            open_jobs = self._open_jobs(ctx.settings.inbox) > 0
            if model.inbox != ctx.settings.inbox and open_jobs:
                # Open jobs name their sources relative to the inbox they were taken from.
                log.warning(
                    "config.restart_needed",
                    model=model.name,
                    key="inbox",
                    action="keeping the old inbox until its open jobs are done; reload again then",
                )
                model = model.model_copy(update={"inbox": ctx.settings.inbox})
            rewatch = model.name not in active or model.inbox != ctx.settings.inbox
            ctx.settings = model
            current = self._watchers.get(model.name)
            if rewatch or current is None or new.watch != current.settings:
                stop = self._watch_stops.get(model.name)
                if stop is not None:
                    stop.set()
                self._watchers[model.name] = self._make_watcher(model)
                self._run_watcher(model.name)
                if model.name not in active:
                    log.info("model.added", model=model.name, inbox=str(model.inbox))
            try:
                ctx.api_key = model.read_api_key()
                register_secret(ctx.api_key)
            except ConfigError as e:
                log.error("model.key_unreadable", model=model.name, error=str(e))
            if ctx.paused_reason is not None:
                self._schedule_probe(ctx, 0.0)
        self.retention.poke()
        log.info("config.reloaded", models=sorted(new_names))
        self._notifier.send("READY=1", f"STATUS={self.summary()}")
        return True

    def _check_limits(self) -> None:
        s = self.settings
        inboxes = len({inbox_key(m.inbox) for m in s.models})
        result = limits.plan(
            limits.read_limits(),
            inboxes=inboxes,
            workers=s.pool.workers,
            polls=s.status.max_concurrent_polls,
            force_polling=s.watch.force_polling,
        )
        limits.apply(result)
        self.watch_hub.event_slots = result.event_slots

    def _run_watcher(self, name: str) -> None:
        stop = self._watch_stops[name] = asyncio.Event()
        self._spawn(self._supervise(self._watchers[name], stop), f"watch-{name}")

    async def _supervise(self, watcher: InboxWatcher, stop: asyncio.Event) -> None:
        """Run ``watcher`` until ``stop``; if it dies (a bug), say so at once and start it again after a backoff."""
        failures = 0
        while not stop.is_set():
            started = self._monotonic()
            try:
                await watcher.run(stop)
            except Exception as e:
                if self._monotonic() - started > self.settings.watch.rescan_s:
                    failures = 0  # it ran well for a while: this is a new failure, not the same one again
                failures += 1
                delay = backoff_delay(
                    failures,
                    base_s=self.settings.retry.base_delay_s,
                    max_s=max(self.settings.watch.rescan_s, self.settings.retry.base_delay_s),
                    rng=self._rng,
                )
                log.error(
                    "watcher.died",
                    model=watcher.model,
                    error=f"{type(e).__name__}: {e}",
                    failures=failures,
                    restart_in_s=round(delay, 3),
                    exc_info=True,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _shutdown(self, workers: list[asyncio.Task[None]]) -> None:
        for timer in self._timers:
            timer.cancel()
        grace = self.settings.pool.shutdown_grace_s
        if workers:
            _, pending = await asyncio.wait(workers, timeout=grace)
            if pending:
                log.warning("service.grace_expired", cancelled=len(pending), grace_s=grace)
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Long-lived tasks catch what they expect; anything else is a bug worth a loud line, not silence.
            log.error("service.task_died", task=task.get_name(), error=repr(task.exception()))

    # -- models -------------------------------------------------------------------------------------------------------
    def _start_model(self, model: ModelSettings) -> None:
        watcher = self._make_watcher(model)  # first: an inbox that cannot be created leaves nothing half-registered
        reason: str | None = None
        try:
            key = model.read_api_key()
        except ConfigError as e:
            key = ""
            reason = str(e)
        register_secret(key)
        ctx = ModelContext(model, key)
        self.models[model.name] = ctx
        stored = self.ledger.models().get(model.name, {}).get("paused_reason")
        if reason is not None:
            self._pause(ctx, reason)
        elif stored:
            # Paused by an earlier run: try the key again now rather than wait a whole interval.
            ctx.paused_reason = stored
            self._schedule_probe(ctx, 0.0)
        self._watchers[model.name] = watcher

    def _recover_results(self, model: ModelSettings) -> None:
        """The hidden part files of result downloads a kill -9 cut, once per inbox and process (at start; a reload
        that makes a watcher again must not touch the part of a download under way).

        A result is recorded before its part gets its name: a part whose job recorded it (a job of this inbox, its
        name not there yet) is complete and gets its name now; any other was cut off mid-way, or never recorded (a
        download tried again later): removed."""
        key = inbox_key(model.inbox)
        if key in self._results_recovered:
            return
        self._results_recovered.add(key)
        done = model.inbox / "done"
        for part in done.glob(".*.part"):
            parsed = parse_result_part(part.name)
            if parsed is None and not part.name.endswith(".result.zip.part"):  # (the download's name before)
                continue
            with contextlib.suppress(OSError):
                if not stat.S_ISREG(os.lstat(part).st_mode):
                    continue  # a folder or a link of that name is not ours
            if parsed is not None and self._place_recorded(model, part, *parsed):
                continue
            try:
                part.unlink(missing_ok=True)
            except OSError as e:  # done/ read-only, say: not a reason to refuse to start (tried again next start)
                log.warning("result.partial_not_removed", model=model.name, path=str(part), error=str(e))
                continue
            log.info("result.removed_partial", model=model.name, path=str(part))

    def _place_recorded(self, model: ModelSettings, part: Path, name: str, job_id: int) -> bool:
        """Give a recorded result its name (see :meth:`_recover_results`); False if ``part`` is not such a one."""
        relative = f"done/{name}"
        try:
            job = self.ledger.get(job_id)
        except KeyError:
            return False
        key = inbox_key(model.inbox)
        owner = job.inbox or (key if job.model == model.name else None)  # before schema 3: no inbox, its model's
        if owner != key or job.result_path != relative:
            return False
        try:
            if same_file(part, model.inbox / relative):  # a kill inside the move (its link made, its unlink not)
                with contextlib.suppress(OSError):  # placed already: a part left is only a second name
                    part.unlink()
            else:
                rename_no_replace(part, model.inbox / relative)
        except FileExistsError as e:  # the name taken meanwhile (a file of the user's): not recorded after all
            self.ledger.update(job.id, result_path=None, event="result_not_placed", detail={"path": relative})
            log.warning("retrain.download_failed", **job.log_fields(), error=str(e), attempt=0)
            return False
        except OSError as e:  # done/ not writable now: the part and its record are kept, placed at a later start
            log.warning("result.not_placed", **job.log_fields(), path=relative, error=str(e),
                        action="kept as its hidden part; placed at the next start")
            return True
        log.info("retrain.result_downloaded", model=job.model, job_id=job.id, file=job.upload_filename,
                 path=relative, size_bytes=(model.inbox / relative).stat().st_size, recovered=True)
        return True

    def _make_watcher(self, model: ModelSettings) -> InboxWatcher:
        for folder in (model.inbox, model.inbox / "done", model.inbox / "failed"):
            folder.mkdir(parents=True, exist_ok=True)
        self._recover_results(model)
        return InboxWatcher(
            model.name,
            model.inbox,
            self.settings.watch,
            on_candidate=functools.partial(self._take, model.name),
            on_reject=functools.partial(self._reject, model.name),
            is_taken=functools.partial(self._is_taken, inbox_key(model.inbox)),
            clock=self._monotonic,
            hub=self.watch_hub,
        )

    def _pause(self, ctx: ModelContext, reason: str) -> None:
        if reason == PROXY_AUTH_FAILED:  # one proxy for all: every model would fail the same way
            for other in self.models.values():
                self._pause_one(other, reason)
        else:
            self._pause_one(ctx, reason)

    def _pause_one(self, ctx: ModelContext, reason: str) -> None:
        if ctx.paused_reason is None:
            ctx.paused_reason = reason
            self.ledger.set_paused(ctx.name, reason)
            log.error("model.paused", model=ctx.name, error=reason, retry_in_s=self.settings.retry.paused_retry_s)
            self._schedule_probe(ctx, self.settings.retry.paused_retry_s)
            self._notify_status()

    def _resume(self, ctx: ModelContext) -> None:
        if ctx.paused_reason is not None:
            ctx.paused_reason = None
            self.ledger.set_paused(ctx.name, None)
            log.info("model.resumed", model=ctx.name, parked_jobs=len(ctx.parked))
        parked, ctx.parked = ctx.parked, set()
        for job_id in sorted(parked):
            self._submit(job_id)
        self.tracker.poke()
        self._notify_status()

    def _schedule_probe(self, ctx: ModelContext, delay: float) -> None:
        """One probe timer per model: scheduling again (a reload, a new pause) replaces the pending one."""
        pending = self._probes.pop(ctx.name, None)
        if pending is not None:
            pending.cancel()
            self._timers.discard(pending)
        self._probes[ctx.name] = self._later(delay, lambda: self._spawn(self._probe(ctx), f"probe-{ctx.name}"))

    async def _probe(self, ctx: ModelContext) -> None:
        """Is the key good now? A status check of a job that cannot exist answers without creating one."""
        if ctx.paused_reason is None or self.stop_event.is_set():
            return
        try:
            ctx.api_key = ctx.settings.read_api_key()
        except ConfigError as e:
            log.warning("model.still_paused", model=ctx.name, error=str(e))
            self._schedule_probe(ctx, self.settings.retry.paused_retry_s)
            return
        register_secret(ctx.api_key)
        try:
            await self.runner.client.get_status(ctx.api_key, PROBE_JOB_ID)
        except ApiError as e:
            if is_credential_error(e):
                log.warning("model.still_paused", model=ctx.name, error=e.describe())
                self._schedule_probe(ctx, self.settings.retry.paused_retry_s)
                return
        except TransportError as e:
            log.warning("model.still_paused", model=ctx.name, error=str(e))
            self._schedule_probe(ctx, self.settings.retry.paused_retry_s)
            return
        self._resume(ctx)

    # -- intake -------------------------------------------------------------------------------------------------------
    async def _take(self, model: str, candidate: Candidate) -> None:
        """Hold the candidate's files now; its job is recorded with the other takes of the same run (the watcher
        hands a burst over without yielding between takes): one commit for them all, not one each."""
        if self.stop_event.is_set():
            return
        inbox = inbox_key(self.models[model].inbox)
        if any((inbox, name) in self._taken for name in candidate.sources):
            return  # held by an open job (of this model under another name, before a reload renamed it)
        for name in candidate.sources:
            self._taken[(inbox, name)] = _RECORDING
        if not self._intake:
            asyncio.get_running_loop().call_soon(self._record_takes)
        self._intake.append((model, inbox, candidate))

    def _record_takes(self) -> None:
        takes, self._intake = self._intake, []
        try:
            # Not flushed (durable=False): a take lost to a power cut is a file still in its inbox, taken again.
            with self.ledger.batch(durable=False):
                jobs = [
                    self.ledger.create_job(
                        model=model,
                        kind=candidate.kind,
                        name=candidate.name,
                        sources=candidate.sources,
                        upload_filename=candidate.upload_filename,
                        inbox=inbox,
                    )
                    for model, inbox, candidate in takes
                ]
        except Exception:
            # Disk full under the ledger, say: nothing was recorded. The files stay in the inbox, settle again and
            # are offered again (the watch goes on).
            for model, inbox, candidate in takes:
                for name in candidate.sources:
                    if self._taken.get((inbox, name)) == _RECORDING:
                        del self._taken[(inbox, name)]
                log.exception("inbox.take_failed", model=model, file=candidate.upload_filename)
            return
        for job, (model, inbox, candidate) in zip(jobs, takes, strict=True):
            for name in candidate.sources:
                self._taken[(inbox, name)] = job.id
            self.metrics.file_seen(model, len(candidate.sources))
            log.info(
                "job.queued",
                model=model,
                job_id=job.id,
                kind=candidate.kind,
                file=candidate.upload_filename,
                sources=list(candidate.sources),
            )
            self._submit(job.id)

    def _is_taken(self, inbox: str, name: str) -> bool:
        return (inbox, name) in self._taken

    def _open_jobs(self, inbox: Path) -> int:
        key = inbox_key(inbox)
        return len({job_id for (where, _), job_id in self._taken.items() if where == key})

    def _release(self, job: Job, ctx: ModelContext) -> None:
        inbox = job.inbox or inbox_key(ctx.inbox)
        back = False
        for name in _held_names(job):
            if self._taken.get((inbox, name)) == job.id:
                del self._taken[(inbox, name)]
                # A file under a released name (dropped over it while the job held it: its event was passed over
                # then) is taken now, not at the next periodic rescan.
                back = back or os.path.lexists(ctx.inbox / name)
        if back:
            self.watch_hub.poke(str(ctx.inbox))

    async def _reject(self, model: str, reject: Reject) -> None:
        job = self.runner.reject(self.models[model], reject.name, reject.reason)
        if not job.closed:
            # Its move or error file failed (a full disk): close it again soon, as any job, not at the next start.
            self._later(self.settings.retry.base_delay_s, lambda: self._submit(job.id))

    def _recover(self) -> None:
        keep: list[Path] = []
        resumed = 0
        for job in self.ledger.unfinished():
            ctx = context_for(self.models, job)
            if ctx is None:
                log.warning("job.model_unknown", job_id=job.id, model=job.model, state=str(job.state))
                continue
            if ctx.name != job.model:
                log.info("job.model_renamed", job_id=job.id, model=ctx.name, was=job.model, inbox=job.inbox)
            inbox = job.inbox or inbox_key(ctx.inbox)
            for name in _held_names(job):
                self._taken[(inbox, name)] = job.id
            if job.package_path and job.state in (State.REQUESTING, State.UPLOADING):
                keep.append(Path(job.package_path))
            log.info(
                "job.resumed",
                model=job.model,
                job_id=job.id,
                state=str(job.state),
                retrain_job_id=job.retrain_job_id,
                put_started=job.put_started,
            )
            self._submit(job.id)
            resumed += 1
        staging = self.settings.staging_dir
        if staging.is_dir():
            for path in packager.clean_staging(staging, keep):
                log.info("staging.removed_leftover", path=str(path))
        # Uploaded jobs of a model that left the config (by name and by inbox): while the daemon ran they were
        # followed with the model's last key; now nothing can. Said once, and followed again if the model (or any
        # model with that inbox) comes back.
        for job in self.ledger.tracked(download=self.settings.status.download_result, auto_switch_models=()):
            if context_for(self.models, job) is None:
                log.warning(
                    "job.untracked",
                    **job.log_fields(),
                    state=str(job.state),
                    reason=f"model {job.model!r} is no longer in the config",
                    action="put the model (or a model with its inbox) back in the config to follow it again",
                )
        log.info("service.recovered", resumed_jobs=resumed)

    # -- the pool -----------------------------------------------------------------------------------------------------
    def _submit(self, job_id: int) -> None:
        if job_id in self._active:
            return
        self._active.add(job_id)
        self._enqueue(job_id)

    def _enqueue(self, job_id: int) -> None:
        try:
            self._queue.put_nowait(job_id)
        except asyncio.QueueFull:
            self._spawn(self._queue.put(job_id), f"enqueue-{job_id}")

    def _later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        def fire() -> None:
            self._timers.discard(handle)
            if not self.stop_event.is_set():
                callback()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)
        return handle

    async def _worker(self, index: int) -> None:
        while not self.stop_event.is_set():
            try:
                job_id = self._queue.get_nowait()  # a backlog: no two tasks and a wait per job
                # Still a turn of the loop per job, as the wait gave one: a run of duplicates closes without awaiting.
                await asyncio.sleep(0)
            except asyncio.QueueEmpty:
                getter = asyncio.ensure_future(self._queue.get())
                stopper = asyncio.ensure_future(self.stop_event.wait())
                done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if getter not in done:
                    getter.cancel()
                    return
                job_id = getter.result()
            self._busy += 1
            self._notify_status()  # STATUS= follows every job start and end, not the next watchdog ping
            try:
                await self._run_job(job_id)
            finally:
                self._busy -= 1
                self._queue.task_done()
                self._notify_status()

    async def _run_job(self, job_id: int) -> None:
        job = self.ledger.get(job_id)
        ctx = context_for(self.models, job)
        if ctx is None:
            self._active.discard(job_id)
            return
        try:
            outcome = await self.runner.process(job_id, ctx, job)
        except OSError as e:
            # The inbox (done/, failed/) unwritable or full while moving: one line, not a traceback every retry.
            log.warning(
                "job.close_failed",
                model=job.model,
                job_id=job_id,
                error=str(e),
                retry_in_s=self.settings.retry.max_delay_s,
            )
            self._later(self.settings.retry.max_delay_s, lambda: self._enqueue(job_id))
            return
        except Exception:
            # Not a bad file (those fail their job): a bug, or the inbox became unwritable while moving. Keep the job
            # and the worker, and try again later; the ledger still says where the job stood.
            log.exception("job.crashed", model=job.model, job_id=job_id, retry_in_s=self.settings.retry.max_delay_s)
            self._later(self.settings.retry.max_delay_s, lambda: self._enqueue(job_id))
            return
        if isinstance(outcome, RetryLater):
            self._later(outcome.delay_s, lambda: self._enqueue(job_id))
            return
        if isinstance(outcome, WaitForWindow):
            if self.window.is_open:  # it opened while the job was being told to wait
                self._enqueue(job_id)
            else:
                self._window_waiting.add(job_id)
                self._notify_status()
            return
        self._active.discard(job_id)
        if isinstance(outcome, Parked):
            ctx.parked.add(job_id)
            self._pause(ctx, outcome.reason)
        elif isinstance(outcome, Closed):
            self._release(job, ctx)

    def _window_opened(self) -> None:
        waiting, self._window_waiting = self._window_waiting, set()
        for job_id in sorted(waiting):
            self._enqueue(job_id)
        self._notify_status()

    # -- reporting ----------------------------------------------------------------------------------------------------
    def _metrics_snapshot(self) -> Snapshot:
        from .admin import waiting_files

        rows = self.ledger.models()
        return Snapshot(
            jobs=self.ledger.counts(),
            paused={name: ctx.paused_reason for name, ctx in self.models.items()},
            ledger_path=self.settings.ledger.path,
            paused_at={name: rows.get(name, {}).get("paused_at") for name in self.models},
            last_success_at={name: rows.get(name, {}).get("last_success_at") for name in self.models},
            oldest_waiting_s={
                m.name: (waiting_files(m.inbox)[1] or {}).get("age_s") for m in self.settings.models
            },
        )

    def _health_snapshot(self) -> Snapshot:
        """What /healthz reads: the paused models (one small table), no job counts, no look into the inboxes."""
        rows = self.ledger.models()
        return Snapshot(
            jobs={},
            paused={name: ctx.paused_reason for name, ctx in self.models.items()},
            ledger_path=self.settings.ledger.path,
            paused_at={name: rows.get(name, {}).get("paused_at") for name in self.models},
        )

    def summary(self) -> str:
        paused = sorted(name for name, ctx in self.models.items() if ctx.paused_reason)
        text = f"{self._queue.qsize()} queued, {self._busy} in flight, {len(self._active)} open"
        text += f"; paused: {', '.join(paused)}" if paused else ""
        if self._window_waiting:
            timetable = self.window.timetable
            text += f"; {len(self._window_waiting)} {window_text(timetable, timetable.opens_at(self._now()))}"
        uploading = self.runner.progress.status_text() if hasattr(self, "runner") else ""
        return text + (f"; {uploading}" if uploading else "")

    def _notify_status(self) -> None:
        if self._notifier.enabled:  # outside systemd: not even the text (twice a job)
            self._notifier.send(f"STATUS={self.summary()}")

    async def _heartbeat(self) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop stalls, systemd restarts us."""
        interval = Notifier.watchdog_interval_s()
        if interval is None:
            return
        while not self.stop_event.is_set():
            self._notifier.send("WATCHDOG=1", f"STATUS={self.summary()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=interval)


def _held_names(job: Job) -> list[str]:
    """The inbox names an open job holds: its sources, and for a reject whose name is not UTF-8 (recorded escaped)
    the entry's own name too, so that the scan at a restart does not reject the same file again as a second job."""
    names = list(job.sources)
    if job.kind == "reject":
        names += [real for real in map(real_name, job.sources) if real not in names]
    return names
