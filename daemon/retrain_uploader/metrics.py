"""An optional Prometheus endpoint and a health check, bound to loopback unless configured otherwise.

``GET /metrics``: counters and a histogram kept in memory, the standard process metrics (memory, open fds, start time),
and, read when scraped, jobs by state, paused models, the age of the oldest waiting file and the last success.
``GET /healthz``: 200 while the event loop answers and the ledger can be written, with the paused models in its body.

The exposition is prometheus_client's (a registry per :class:`Metrics`, so two services in one process never share
counts); it also brings the process collector, which reads /proc the way every Prometheus exporter does.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics", "MetricsServer", "Snapshot"]

_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, float("inf"))
_LEDGER_CHECK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Snapshot:
    """What the daemon knows at scrape time; built by the service, read by both endpoints."""

    jobs: Mapping[str, Mapping[str, int]]  # model -> state -> count
    paused: Mapping[str, str | None]  # model -> the reason it is paused, None while it runs
    ledger_path: Path | None = None
    paused_at: Mapping[str, str | None] = field(default_factory=dict)
    last_success_at: Mapping[str, str | None] = field(default_factory=dict)  # ISO times, as in the ledger
    oldest_waiting_s: Mapping[str, float | None] = field(default_factory=dict)  # None: the inbox is empty


class Metrics:
    """What the daemon counts. Cheap to call from the event loop; nothing is exported unless a server runs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self._files_seen = Counter(
            "retrain_uploader_files_seen", "Upload candidates taken from the inboxes.", ["model"],
            registry=self.registry,
        )
        self._uploads = Counter(
            "retrain_uploader_uploads", "Completed uploads (each one starts a retraining).", ["model"],
            registry=self.registry,
        )
        self._upload_bytes = Counter(
            "retrain_uploader_upload_bytes", "Bytes in completed uploads.", ["model"], registry=self.registry
        )
        self._retries = Counter(
            "retrain_uploader_retries", "Steps scheduled to be tried again.", ["model", "state"],
            registry=self.registry,
        )
        self._durations = Histogram(
            "retrain_uploader_upload_duration_seconds", "Duration of the PUT step.", ["model"],
            buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        # uploaded()'s children of each model: uploads, bytes, and the histogram's once a PUT was timed (a child
        # appears in /metrics once made: an upload confirmed by a status check alone makes none)
        self._per_model: dict[str, list[Any]] = {}
        self._scrape = _ScrapeCollector()
        self.registry.register(self._scrape)

    def file_seen(self, model: str, count: int = 1) -> None:
        self._files_seen.labels(model=model).inc(count)

    def retry(self, model: str, step: str) -> None:
        self._retries.labels(model=model, state=step).inc()

    def uploaded(self, model: str, size: int, duration_s: float | None) -> None:
        per_model = self._per_model.get(model)
        if per_model is None:  # labels() checks its arguments and takes a lock: once per model, not per file
            per_model = self._per_model[model] = [
                self._uploads.labels(model=model), self._upload_bytes.labels(model=model), None
            ]
        per_model[0].inc()
        per_model[1].inc(size)
        if duration_s is not None:
            durations = per_model[2]
            if durations is None:
                durations = per_model[2] = self._durations.labels(model=model)
            durations.observe(duration_s)

    def render(self, snapshot: Snapshot) -> bytes:
        """The text exposition (format 0.0.4) with ``snapshot`` as the scrape-time gauges."""
        self._scrape.snapshot = snapshot
        return generate_latest(self.registry)


class _ScrapeCollector(Collector):
    """The gauges read from the daemon's state when scraped, not kept up to date between scrapes."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on the models configured at scrape time

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        jobs = GaugeMetricFamily("retrain_uploader_jobs", "Jobs in the ledger by model and state.",
                                 labels=["model", "state"])
        for model, states in sorted(snap.jobs.items()):
            for state, n in sorted(states.items()):
                jobs.add_metric([model, state], n)
        yield jobs
        paused = GaugeMetricFamily("retrain_uploader_model_paused",
                                   "1 while a model is paused by a credential error.", labels=["model"])
        for model, reason in sorted(snap.paused.items()):
            paused.add_metric([model], int(reason is not None))
        yield paused
        oldest = GaugeMetricFamily("retrain_uploader_oldest_waiting_file_age_seconds",
                                   "Age of the oldest file waiting in the inbox (0 when it is empty).",
                                   labels=["model"])
        for model, age in sorted(snap.oldest_waiting_s.items()):
            oldest.add_metric([model], age or 0.0)
        yield oldest
        success = GaugeMetricFamily("retrain_uploader_last_success_timestamp_seconds",
                                    "When the last upload of the model completed (absent: never).",
                                    labels=["model"])
        for model, at in sorted(snap.last_success_at.items()):
            if at:
                success.add_metric([model], datetime.fromisoformat(at).timestamp())
        yield success


class MetricsServer:
    """Serves ``GET /metrics`` and ``GET /healthz``. ``snapshot`` returns the daemon's state at request time;
    ``health``, if given, the part ``/healthz`` reads (paused models, the ledger's path) without what only a scrape
    needs (job counts, a look into every inbox): a probe every few seconds costs the event loop next to nothing."""

    def __init__(
        self,
        metrics: Metrics,
        snapshot: Callable[[], Snapshot],
        *,
        health: Callable[[], Snapshot] | None = None,
        host: str = "127.0.0.1",
        port: int = 9464,
    ) -> None:
        self._metrics = metrics
        self._snapshot = snapshot
        self._health_snapshot = health or snapshot
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(self._snapshot()),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def _health(self, _request: web.Request) -> web.Response:
        # This handler runs on the daemon's event loop: that it answers at all is the loop's half of the check.
        snap = self._health_snapshot()
        problems: list[str] = []
        if snap.ledger_path is not None:
            problem = await asyncio.to_thread(_ledger_unwritable, snap.ledger_path)
            if problem:
                problems.append(problem)
        body: dict[str, Any] = {
            "status": "ok" if not problems else "unhealthy",
            "ledger_writable": not problems,
            "problems": problems,
            "paused_models": [
                {"model": model, "reason": reason, "since": snap.paused_at.get(model)}
                for model, reason in sorted(snap.paused.items())
                if reason is not None
            ],
        }
        return web.json_response(body, status=200 if not problems else 503,
                                 headers={"Cache-Control": "no-store"})


def _ledger_unwritable(path: Path) -> str | None:
    """Why the ledger cannot take a write now, or None. Its own short-lived connection in a worker thread: the
    daemon's connection is the event loop's, and a write lock held elsewhere must not stall the loop."""
    try:
        st = os.statvfs(path.parent)
        if st.f_bavail == 0:
            return f"ledger: no free space on the file system of {path.parent}"
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=_LEDGER_CHECK_TIMEOUT_S,
                             isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock, as any step of a job would
            db.execute("ROLLBACK")
        finally:
            db.close()
    except (OSError, sqlite3.Error) as e:
        return f"ledger: cannot write {path}: {e}"
    return None
