"""Review round s6b (issue 13's commits f1dd136, bf787c4, 8dd2189): each test failing before its fix."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from retrain_uploader.emulator import Emulator

from .conftest import drop
from .test_cli import StartDaemon
from .test_service import CSV, SENT


async def test_a_full_read_while_the_upload_is_closed_does_not_check_the_job_at_once(
    start_daemon: StartDaemon, emulator: Emulator, before_renames: list[Callable[[str, str, str], None]]
) -> None:
    """The job is recorded `uploaded` before its files are moved to done/ (in a thread for a large file or a pair);
    the tracker was told of it only once they were. A full read of the ledger in between (every poll_s, or a model
    resumed: poke) found it unscheduled and gave it a restart's first phase: checked at once (0.004 s after the PUT),
    not one poll_s after it."""
    d = await start_daemon(status={"poll_s": 1.0, "max_poll_s": 1.0})
    loop = asyncio.get_running_loop()
    poked = threading.Event()

    def during_close(_event: str, _src: str, dst: str) -> None:
        if "/done/" in dst and not poked.is_set():
            poked.set()
            loop.call_soon_threadsafe(d.service.tracker.poke)  # another model resumed, say, while this one closes
            threading.Event().wait(0.3)  # the close goes on meanwhile (a slow disk)

    before_renames.append(during_close)
    big = CSV + "".join(f"{i},{i % 90},basic\n" for i in range(3, 40_000))  # > 256 KiB: closed in a thread
    drop(d.inbox(), "a.csv", big)
    [job] = await d.closed_jobs(1)
    assert job.state in SENT and poked.is_set()
    await asyncio.sleep(1.3)
    put = [r.at for r in emulator.requests if r.endpoint == "put" and r.status == 200]
    checks = [r.at for r in emulator.requests if r.endpoint == "status" and r.job_id == job.retrain_job_id]
    assert len(put) == 1 and checks[0] < put[0] < checks[1]  # the baseline, the PUT, the first check
    assert checks[1] - put[0] >= 0.85, checks[1] - put[0]  # one poll_s (less its jitter) after the PUT
