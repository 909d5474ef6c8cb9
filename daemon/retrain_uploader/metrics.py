"""An optional Prometheus endpoint (text format 0.0.4), bound to loopback unless configured otherwise.

Counters and one histogram are kept in memory; jobs by state and paused models are read when scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Mapping

from aiohttp import web

__all__ = ["Metrics", "MetricsServer"]

_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, float("inf"))


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels.items()
    )
    return "{" + ",".join(escaped) + "}"


class Metrics:
    """What the daemon counts. Cheap to call from the event loop; nothing is exported unless a server runs."""

    def __init__(self) -> None:
        self.files_seen: Counter[str] = Counter()
        self.uploads: Counter[str] = Counter()
        self.upload_bytes: Counter[str] = Counter()
        self.retries: Counter[tuple[str, str]] = Counter()
        self._durations: dict[str, list[int]] = {}
        self._duration_sum: dict[str, float] = {}

    def file_seen(self, model: str, count: int = 1) -> None:
        self.files_seen[model] += count

    def retry(self, model: str, step: str) -> None:
        self.retries[(model, step)] += 1

    def uploaded(self, model: str, size: int, duration_s: float | None) -> None:
        self.uploads[model] += 1
        self.upload_bytes[model] += size
        if duration_s is not None:
            buckets = self._durations.setdefault(model, [0] * len(_DURATION_BUCKETS))
            buckets[bisect.bisect_left(_DURATION_BUCKETS, duration_s)] += 1
            self._duration_sum[model] = self._duration_sum.get(model, 0.0) + duration_s

    def render(self, jobs_by_state: Mapping[str, Mapping[str, int]], paused: Mapping[str, bool]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("retrain_uploader_files_seen_total", "counter", "Upload candidates taken from the inboxes.")
        out += [f"retrain_uploader_files_seen_total{_labels(model=m)} {n}" for m, n in sorted(self.files_seen.items())]
        family("retrain_uploader_uploads_total", "counter", "Completed uploads (each one starts a retraining).")
        out += [f"retrain_uploader_uploads_total{_labels(model=m)} {n}" for m, n in sorted(self.uploads.items())]
        family("retrain_uploader_upload_bytes_total", "counter", "Bytes in completed uploads.")
        out += [
            f"retrain_uploader_upload_bytes_total{_labels(model=m)} {n}" for m, n in sorted(self.upload_bytes.items())
        ]
        family("retrain_uploader_retries_total", "counter", "Steps scheduled to be tried again.")
        out += [
            f"retrain_uploader_retries_total{_labels(model=m, state=s)} {n}"
            for (m, s), n in sorted(self.retries.items())
        ]
        family("retrain_uploader_jobs", "gauge", "Jobs in the ledger by model and state.")
        for model, states in sorted(jobs_by_state.items()):
            out += [f"retrain_uploader_jobs{_labels(model=model, state=s)} {n}" for s, n in sorted(states.items())]
        family("retrain_uploader_model_paused", "gauge", "1 while a model is paused by a credential error.")
        out += [f"retrain_uploader_model_paused{_labels(model=m)} {int(p)}" for m, p in sorted(paused.items())]
        family("retrain_uploader_upload_duration_seconds", "histogram", "Duration of the PUT step.")
        for model, buckets in sorted(self._durations.items()):
            running = 0
            for bound, count in zip(_DURATION_BUCKETS, buckets, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f"retrain_uploader_upload_duration_seconds_bucket{_labels(model=model, le=le)} {running}")
            out.append(
                f"retrain_uploader_upload_duration_seconds_sum{_labels(model=model)} {self._duration_sum[model]}"
            )
            out.append(f"retrain_uploader_upload_duration_seconds_count{_labels(model=model)} {running}")
        return "\n".join(out) + "\n"


class MetricsServer:
    """Serves ``GET /metrics``. ``snapshot`` returns (jobs by state, paused models) at scrape time."""

    def __init__(
        self,
        metrics: Metrics,
        snapshot: Callable[[], tuple[Mapping[str, Mapping[str, int]], Mapping[str, bool]]],
        *,
        host: str = "127.0.0.1",
        port: int = 9464,
    ) -> None:
        self._metrics = metrics
        self._snapshot = snapshot
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, _request: web.Request) -> web.Response:
        jobs, paused = self._snapshot()
        return web.Response(
            text=self._metrics.render(jobs, paused),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )
