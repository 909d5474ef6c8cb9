"""Takes of a burst and small checks on the event loop (issue 13 "cheaper per file"), from an adversarial review:
real processes, files, tmpfs and sockets. The last two failed before their fixes (the loop held 375 ms by Shift_JIS
files checked inline; a reject whose record failed was never offered again)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from retrain_uploader.emulator import Emulator

from .conftest import drop, fill_disk, wait_for
from .test_crash import Setup, table


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_jobs", [1, 40])
async def test_kill_9_during_a_burst_of_150_drops_takes_each_file_once(
    tmp_path: Path, daemons, kill_after_jobs: int
) -> None:
    """150 files dropped at once while the daemon runs (takes grouped 32 per commit); kill -9 as soon as the ledger
    holds kill_after_jobs jobs. After the restart: every file in done/ once, every content PUT once, all closed."""
    (tmp_path / "store").mkdir()
    async with Emulator(keys={"key-alpha-0001": 1}, store_dir=tmp_path / "store", latency_s=0.005) as emulator:
        s = Setup(tmp_path, emulator.base_url, pool={"workers": 4, "shutdown_grace_s": 5})
        d = await daemons(s.config).start()
        for i in range(150):
            s.drop(f"f{i:03}.csv", table(1000 + i))
        await wait_for(lambda: len(s.ledger.jobs()) >= kill_after_jobs, 15, "jobs recorded")
        await d.kill()
        taken = len(s.ledger.jobs())
        await d.start()
        await s.ledger.all_closed(150, timeout=60)
        jobs = s.check_final(emulator, d, uploads=150)
        assert len(jobs) == 150, f"{len(jobs)} jobs for 150 files (taken {taken} before the kill)"


def _cp932_csv(seed: int, size: int = 250 * 1024) -> bytes:
    """A Shift-JIS (cp932) export of about ``size`` bytes: not UTF-8, so it takes the full (slow) check."""
    rows = "".join(f"東京都{seed}-{i},{i},テスト値,{i % 7}.5\n" for i in range(size // 20))
    data = ("地域,数,名前,値\n" + rows).encode("cp932")
    return data[: data.rfind(b"\n", 0, size) + 1]


async def test_small_non_utf8_csvs_do_not_block_the_event_loop(start_daemon, tmp_path: Path) -> None:
    """A csv <= 256 KiB is checked on the event loop ("about a millisecond"). A Shift-JIS export of 250 KiB takes
    the full check: ~115 ms each on this machine, during which nothing else on the loop runs (other jobs' PUTs,
    status polls, the watchdog, signals). Promise: a burst of small files never stalls the loop for long."""
    d = await start_daemon(pool={"workers": 4, "shutdown_grace_s": 5})
    lags: list[float] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        # A gap counts as the daemon's stall only while this process had the CPU: each gap is measured both on the
        # wall clock and in the process' CPU time (the loop's and every check thread's), and the smaller is kept. On
        # a quiet machine the two agree (a check inline, or checks in threads fighting the loop for the GIL, burn CPU
        # for as long as the loop waits); on a shared, busy CI machine the wall clock also counts the time the kernel
        # ran other processes instead of this one, which no code here can prevent (seen: 265 ms, 2 in 10 runs).
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before, cpu_before = loop.time(), time.process_time()
            await asyncio.sleep(0.005)
            wall, cpu = loop.time() - before, time.process_time() - cpu_before
            lags.append(min(wall, cpu) - 0.005)

    task = asyncio.create_task(sampler())
    for i in range(12):
        drop(d.inbox(), f"sjis{i:02}.csv", _cp932_csv(i))
    try:
        jobs = await d.closed_jobs(12, timeout=40)
    finally:
        stop.set()
        await task
    assert {str(j.state) for j in jobs} <= {"uploaded", "retraining", "finished", "duplicate"}, jobs
    worst, second = sorted(lags)[-2:][::-1]
    # Measured here: ~375 ms worst with 250 KiB checked inline, still ~375 ms with the checks in 4 threads at once
    # (the loop must win the GIL back after every syscall); ~100 ms with one check thread at a time (Runner._checking).
    # Those stalls come again and again over the 12 files; a machine busy with other work adds a single spike now and
    # then (seen: 275 ms once in a full run, even counted in CPU time): the second worst gap is judged, the worst is
    # only bounded.
    why = f"the event loop stalled {worst * 1000:.0f} and {second * 1000:.0f} ms: small non-UTF-8 csvs checked on it"
    assert second < 0.25 and worst < 0.5, why


async def test_a_reject_the_ledger_could_not_record_is_recorded_once_there_is_room(
    start_daemon, make_settings, small_disk: Path
) -> None:
    """The reject (create + identity + failed) is now one batch: on a full ledger disk nothing is recorded and the
    entry stays in the inbox, as a take does. A take is offered again once there is room; a reject is not: the watcher
    remembered it as rejected before the record failed, so it sits in the inbox unrecorded (until a restart, presumably:
    the memory is per process; not verified here). Fails on the merged code and on the code before the merge."""
    d = await start_daemon(make_settings(ledger={"path": str(small_disk / "ledger.sqlite3")}))
    filler = fill_disk(small_disk)
    target = d.inbox().parent / "elsewhere.csv"
    target.write_text("id,x\n1,2\n")
    with capture_logs() as logs:
        (d.inbox() / "link.csv").symlink_to(target)  # a symlink is never taken: a reject
        await wait_for(lambda: any(e["event"] == "inbox.take_failed" for e in logs), 10, "the reject's record failing")
        assert d.jobs() == []
        filler.unlink()
        # rescan_s is 0.5 s: a few rescans with room on the disk
        [job] = await d.closed_jobs(1, timeout=8)
    assert str(job.state) == "failed" and not (d.inbox() / "link.csv").is_symlink()


def _hex_rows(mib: int) -> bytes:
    """A CSV of about ``mib`` MiB that deflate cannot shrink much (random hex), so zipping it takes a while."""
    lines = [b"%s,%d" % (os.urandom(20).hex().encode(), i) for i in range(50_000)]  # ~2.3 MiB
    block = b"\n".join(lines) + b"\n"
    return b"key,n\n" + block * max(1, mib * 1024 * 1024 // len(block))


async def test_a_file_dropped_while_a_large_pair_is_zipped_does_not_wait_for_it(start_daemon) -> None:
    # Checks run in threads one at a time (the event loop's GIL turns), but in two lanes: a file of a few hundred KB
    # dropped while a large pair is being checked and zipped is checked at once, not after the pair.
    d = await start_daemon(pool={"workers": 4, "shutdown_grace_s": 5})
    train = _hex_rows(48)
    with capture_logs() as logs:
        drop(d.inbox(), "big.eval.csv", train[: 1 << 20].rsplit(b"\n", 1)[0] + b"\n")
        drop(d.inbox(), "big.train.csv", train)
        await wait_for(lambda: [j for j in d.jobs() if str(j.state) == "packaging"], 10, "the pair being packaged")
        drop(d.inbox(), "small.csv", _hex_rows(1)[: 300 * 1024].rsplit(b"\n", 1)[0] + b"\n")
        await d.closed_jobs(2, timeout=40)
    packaged = [e["file"] for e in logs if e["event"] == "job.packaged"]
    assert packaged == ["small.csv", "big.zip"], packaged
