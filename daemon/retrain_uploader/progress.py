"""Progress of the PUTs in flight: an ``upload.progress`` line every ``[logging] progress_s``, the ledger's
``bytes_sent`` (so ``status --json`` shows it), and a short text for systemd's ``STATUS=``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from .client import UploadMeter
from .ledger import Job, Ledger

__all__ = ["Progress", "ProgressReporter", "measure"]

log = structlog.get_logger("retrain_uploader.progress")


@dataclass(frozen=True, slots=True)
class Progress:
    file: str
    bytes_sent: int
    size_bytes: int
    percent: float
    rate_bytes_s: float
    eta_s: float | None

    def fields(self) -> dict[str, Any]:
        return {
            "bytes_sent": self.bytes_sent,
            "size_bytes": self.size_bytes,
            "percent": self.percent,
            "rate_bytes_s": round(self.rate_bytes_s),
            "eta_s": self.eta_s,
        }

    def text(self) -> str:
        eta = f", {self.eta_s:.0f} s left" if self.eta_s is not None else ""
        return f"{self.file} {self.percent:.0f}% at {self.rate_bytes_s / 1e6:.1f} MB/s{eta}"


def measure(file: str, sent: int, size: int, *, previous: int, interval_s: float) -> Progress:
    """The progress after ``interval_s`` in which ``sent`` went from ``previous``: the rate over that interval."""
    rate = max(sent - previous, 0) / interval_s if interval_s > 0 else 0.0
    left = max(size - sent, 0)
    eta = round(left / rate, 1) if rate > 0 else None
    percent = round(100.0 * sent / size, 1) if size > 0 else 100.0
    return Progress(file, sent, size, percent, rate, eta)


class ProgressReporter:
    """Reports each PUT in flight every ``every_s``; ``on_change`` is told when the set of reports changes."""

    def __init__(
        self,
        ledger: Ledger,
        every_s: Callable[[], float],
        *,
        on_change: Callable[[], None] = lambda: None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._every_s = every_s
        self.on_change = on_change
        self._monotonic = monotonic
        self.current: dict[int, Progress] = {}

    @contextlib.asynccontextmanager
    async def watching(self, job: Job, meter: UploadMeter) -> AsyncIterator[None]:
        task = asyncio.create_task(self._report(job, meter), name=f"progress-{job.id}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.current.pop(job.id, None) is not None:
                self.on_change()

    async def _report(self, job: Job, meter: UploadMeter) -> None:
        previous, since = 0, self._monotonic()
        while True:
            await asyncio.sleep(self._every_s())  # a reporting period, not a wait for a result
            now = self._monotonic()
            progress = measure(
                job.upload_filename, meter.sent, job.size_bytes or 0, previous=previous, interval_s=now - since
            )
            previous, since = meter.sent, now
            self.current[job.id] = progress
            self._ledger.update(job.id, bytes_sent=progress.bytes_sent)
            log.info("upload.progress", **job.log_fields(), **progress.fields())
            self.on_change()

    def status_text(self) -> str:
        return "; ".join(f"uploading {p.text()}" for p in self.current.values())
