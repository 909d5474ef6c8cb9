#!/usr/bin/env python3
"""Status polling at scale: thousands of jobs retraining, one daemon, is the API's load spread evenly?

    .venv/bin/python bench/polling.py [--jobs 5000] [--poll-s 60] [--max-poll-s 60] [--seconds 180]

The emulator runs in a process of its own (bench/_emu.py) with ``--jobs`` jobs already uploaded that stay
``retraining`` for good; the ledger holds the same jobs in state ``retraining`` (one made through the real Ledger
API, the rest copied from it in one transaction on the real schema: 5,000 jobs through the API would be 10,000
fsync'd commits); the real daemon (``retrain-uploader run``) is a subprocess. The bench records the emulator's
status requests (each carries its arrival time on the system-wide monotonic clock) for ``--seconds`` from the first
one, then prints:

* the mean status request rate, and the busiest one-second window (sliding: every window that starts at a request)
  over that mean: the target is <= 2x; also for the first ``poll_s`` (the start-up spread of jobs the tracker found
  in the ledger) and for the steady state after it;
* the per-job interval between two checks (median, p95, min, max) against the one the tracker means to keep: a
  daemon that cannot keep up polls at a flat rate (no burst) but each job less often than meant;
* the daemon's CPU (user + system, from /proc/PID/stat) over the window, per status request, and its RSS
  (VmRSS at the end, VmHWM);
* the load average at the start and at the end (the machine is shared).

``--max-poll-s`` defaults to ``--poll-s``: the interval then stays at ``poll_s`` whatever a job's age, so the run
measures the spreading alone. With a larger ``--max-poll-s`` the interval grows to a tenth of a job's age (see
``tracker.poll_interval``); ``--age-s`` sets how long ago the jobs were uploaded.

Ends with one JSON line with every figure. Exit code 0 whatever the verdict.

Another version of the daemon, for a before/after: ``git archive REV daemon | tar -x -C /tmp/old`` and run the bench
with ``PYTHONPATH=/tmp/old/daemon``: the daemon and the ledger it is given are then that version's (the emulator
stays this tree's, which can hold jobs retraining for good).
"""

# ruff: noqa: S603, S310 -- the bench starts our own programs and reads the emulator's admin routes on loopback

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrain_uploader.config import StatusSettings
from retrain_uploader.ledger import Ledger, State

HERE = Path(__file__).resolve().parent
KEY = "bench-poll-key-0001"
MODEL = "bench"
TARGET_RATIO = 2.0
INTERVAL_TOLERANCE = 0.05  # the per-job median interval within 5 % of the intended one
_TICKS = os.sysconf("SC_CLK_TCK")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.load(resp)


class EmulatorProcess:
    """bench/_emu.py with ``running`` jobs retraining for good; stopped with SIGTERM."""

    def __init__(self, *, running: int, latency_s: float) -> None:
        cmd = [
            sys.executable,
            str(HERE / "_emu.py"),
            "--key",
            f"{KEY}=1",
            "--latency-s",
            str(latency_s),
            "--running",
            str(running),
        ]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # this tree's emulator, whatever the daemon's
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.base_url = line.split()[1]

    def job_ids(self) -> list[str]:
        return sorted(get_json(f"{self.base_url}/_emulator/jobs"))

    def status_requests(self) -> list[dict[str, Any]]:
        return [r for r in get_json(f"{self.base_url}/_emulator/requests") if r["endpoint"] == "status"]

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build_ledger(path: Path, inbox: Path, job_ids: list[str], *, age_s: float) -> None:
    """One job through the Ledger API (uploaded, closed, retraining), then a copy of its row per other job id."""
    uploaded = time.time() - age_s
    with Ledger(path, clock=lambda: uploaded) as ledger:
        first = ledger.create_job(
            model=MODEL,
            kind="csv",
            name="running-0.csv",
            sources=["running-0.csv"],
            upload_filename="running-0.csv",
            inbox=str(inbox),
        )
        ledger.update(
            first.id,
            state=State.RETRAINING,
            sha256="0" * 64,
            content_sha256="0" * 64,
            size_bytes=100,
            retrain_job_id=job_ids[0],
            status_before_put="waiting_for_upload",
            put_started=True,
            attempts=1,
            moved_to=["done/running-0.csv"],
            closed=True,
            uploaded_at=ledger.now(),
            retrain_status="retraining",
            event="retrain_status",
            detail={"status": "retraining", "message": None},
        )
    db = sqlite3.connect(path, isolation_level=None)
    try:
        columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)") if row[1] != "id"]
        varied = {"name", "sources", "upload_filename", "retrain_job_id", "content_sha256", "sha256"}
        select = ", ".join(f":{c}" if c in varied else c for c in columns)
        sql = f"INSERT INTO jobs ({', '.join(columns)}) SELECT {select} FROM jobs WHERE id = {first.id}"  # noqa: S608
        rows = []
        for n, job_id in enumerate(job_ids[1:], start=1):
            name = f"running-{n}.csv"
            digest = f"{n:064x}"
            rows.append(
                {
                    "name": name,
                    "sources": json.dumps([name]),
                    "upload_filename": name,
                    "retrain_job_id": job_id,
                    "content_sha256": digest,
                    "sha256": digest,
                }
            )
        db.execute("BEGIN")
        db.executemany(sql, rows)
        db.execute("COMMIT")
        count = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (State.RETRAINING,)).fetchone()[0]
    finally:
        db.close()
    if count != len(job_ids):
        raise RuntimeError(f"the ledger holds {count} retraining jobs, not {len(job_ids)}")


def write_config(root: Path, base_url: str, args: argparse.Namespace) -> Path:
    key_file = root / "keys" / MODEL
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    status = [f"poll_s = {args.poll_s!r}", "download_result = false"]
    if "max_poll_s" in StatusSettings.model_fields:  # not in a daemon from before the tracker spread its polls
        status.append(f"max_poll_s = {args.max_poll_s!r}")
    if args.max_concurrent_polls is not None:
        status.append(f"max_concurrent_polls = {args.max_concurrent_polls}")
    text = (
        "\n".join(
            [
                "[api]",
                f"base_url = {json.dumps(base_url)}",
                "[ledger]",
                f"path = {json.dumps(str(root / 'state' / 'ledger.sqlite3'))}",
                "[status]",
                *status,
                "[[models]]",
                f"name = {json.dumps(MODEL)}",
                f"inbox = {json.dumps(str(root / 'inbox'))}",
                f"api_key_file = {json.dumps(str(key_file))}",
            ]
        )
        + "\n"
    )
    path = root / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def daemon_command() -> list[str]:
    script = Path(sys.executable).with_name("retrain-uploader")
    return [str(script)] if script.exists() else [sys.executable, "-m", "retrain_uploader.cli"]


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of stat)


def memory_mib(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as f:
        values = dict(line.split(":", 1) for line in f)
    return {key: int(values[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def busiest_window(times: list[float], width: float = 1.0) -> int:
    """The most requests in any window [t, t + width) (it suffices to try the windows that start at a request)."""
    best = 0
    for i, start in enumerate(times):
        best = max(best, bisect.bisect_left(times, start + width, lo=i) - i)
    return best


def spread(times: list[float], start: float, end: float) -> dict[str, float]:
    inside = times[bisect.bisect_left(times, start) : bisect.bisect_left(times, end)]
    mean = len(inside) / (end - start)
    busiest = busiest_window(inside)
    per_second = [0] * int(end - start)
    for t in inside:
        per_second[min(int(t - start), len(per_second) - 1)] += 1
    return {
        "requests": len(inside),
        "seconds": round(end - start, 1),
        "mean_per_s": round(mean, 2),
        "max_1s_window": busiest,
        "max_over_mean": round(busiest / mean, 2) if mean else 0.0,
        "min_whole_second": min(per_second) if per_second else 0,
        "max_whole_second": max(per_second) if per_second else 0,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def intervals(
    requests: list[dict[str, Any]], start: float, end: float, intended: Callable[[float], float]
) -> dict[str, float]:
    """Gaps between two checks of one job, and each gap over ``intended(t)``, the interval the tracker means to keep
    after a check at ``t`` (with an age-grown interval it is longer for later checks)."""
    by_job: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        if start <= r["at"] < end:
            by_job[r["job_id"]].append(r["at"])
    pairs = [(a, b) for times in by_job.values() for a, b in itertools.pairwise(times)]
    if not pairs:
        return {"count": 0}
    gaps = [b - a for a, b in pairs]
    return {
        "count": len(gaps),
        "median_s": round(statistics.median(gaps), 2),
        "p95_s": round(percentile(gaps, 0.95), 2),
        "min_s": round(min(gaps), 2),
        "max_s": round(max(gaps), 2),
        "median_over_intended": round(statistics.median((b - a) / intended(a) for a, b in pairs), 3),
        "jobs_checked": len(by_job),
    }


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "load_avg_start": load_avg(),
        "jobs": args.jobs,
        "poll_s": args.poll_s,
        "max_poll_s": args.max_poll_s,
        "age_s": args.age_s,
        "latency_s": args.latency_s,
        "max_concurrent_polls": args.max_concurrent_polls or "default",
    }
    emu = EmulatorProcess(running=args.jobs, latency_s=args.latency_s)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        job_ids = emu.job_ids()
        (root / "inbox").mkdir()
        started = time.monotonic()
        build_ledger(root / "state" / "ledger.sqlite3", root / "inbox", job_ids, age_s=args.age_s)
        result["ledger_build_s"] = round(time.monotonic() - started, 2)
        config = write_config(root, emu.base_url, args)
        with open(root / "daemon.log", "wb") as log:
            daemon = subprocess.Popen(
                [*daemon_command(), "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        spawned = time.monotonic()
        while not (first := emu.status_requests()):
            if daemon.poll() is not None or time.monotonic() - spawned > 60:
                raise RuntimeError(f"the daemon made no status request; see {root / 'daemon.log'}")
            time.sleep(0.2)
        t0 = min(r["at"] for r in first)
        result["first_status_after_spawn_s"] = round(t0 - spawned, 2)
        cpu_start = cpu_s(daemon.pid)
        end = t0 + args.seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 5.0))
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.returncode}); see {root / 'daemon.log'}")
        result["daemon_cpu_s_in_window"] = round(cpu_s(daemon.pid) - cpu_start, 2)
        result["daemon_cpu_s_total"] = round(cpu_s(daemon.pid), 2)
        result["daemon_memory_mib"] = {k: round(v, 1) for k, v in memory_mib(daemon.pid).items()}
        requests = sorted(emu.status_requests(), key=lambda r: r["at"])
    finally:
        if daemon is not None:
            stop_process(daemon)
        emu.stop()
    times = [r["at"] for r in requests]
    window = [r for r in requests if t0 <= r["at"] < end]
    result["answers_not_200"] = sum(1 for r in window if r["status"] not in (200, None))
    result["unanswered_at_end"] = sum(1 for r in window if r["status"] is None)  # in flight when the list was read
    if args.keep is not None:
        (root / "status_requests.json").write_text(json.dumps(requests))
    result["whole"] = spread(times, t0, end)
    first_period = min(t0 + args.poll_s, end)
    result["first_poll_s"] = spread(times, t0, first_period)
    if end - first_period >= 10:
        result["after_first_poll_s"] = spread(times, first_period, end)

    def intended(at: float) -> float:  # tracker.poll_interval at the job's age then (written out: any version's)
        return max(args.poll_s, min(args.max_poll_s, 0.1 * (args.age_s + at - t0)))

    result["interval"] = intervals(requests, t0, end, intended)
    polls = result["whole"]["requests"]
    result["daemon_cpu_ms_per_status"] = round(1000 * result["daemon_cpu_s_in_window"] / polls, 3) if polls else None
    result["daemon_cpu_pct"] = round(100 * result["daemon_cpu_s_in_window"] / args.seconds, 1)
    result["verdict"] = "PASS" if result["whole"]["max_over_mean"] <= TARGET_RATIO else "FAIL"
    # A daemon that cannot keep up shows a flat rate (no burst) but each job checked later than meant: judged apart.
    ratio = result["interval"].get("median_over_intended")
    on_time = ratio is not None and abs(ratio - 1) <= INTERVAL_TOLERANCE
    result["interval_verdict"] = "PASS" if on_time else "FAIL"
    result["load_avg_end"] = load_avg()
    return result


def report(res: dict[str, Any]) -> None:
    print(
        f"{res['jobs']} jobs retraining, poll_s {res['poll_s']:g}, max_poll_s {res['max_poll_s']:g}"
        f" (jobs uploaded {res['age_s']:g} s before), max_concurrent_polls {res['max_concurrent_polls']},"
        f" emulator latency {res['latency_s'] * 1000:g} ms"
    )
    print(
        f"ledger built in {res['ledger_build_s']} s; first status request {res['first_status_after_spawn_s']} s"
        " after the daemon was started"
    )
    for name in ("whole", "first_poll_s", "after_first_poll_s"):
        if name not in res:
            continue
        s = res[name]
        print(
            f"{name:>19}: {s['requests']} status requests in {s['seconds']} s = {s['mean_per_s']}/s;"
            f" busiest 1 s window {s['max_1s_window']} = {s['max_over_mean']}x the mean"
            f" (whole seconds: {s['min_whole_second']}..{s['max_whole_second']})"
        )
    iv = res["interval"]
    if iv["count"]:
        print(
            f"per-job interval: median {iv['median_s']} s, p95 {iv['p95_s']} s, min {iv['min_s']} s,"
            f" max {iv['max_s']} s (poll_s {res['poll_s']:g}; {iv['jobs_checked']} jobs checked)"
        )
    print(
        f"answers other than 200: {res['answers_not_200']} (and {res['unanswered_at_end']} still in flight at the end)"
    )
    mem = res["daemon_memory_mib"]
    print(
        f"daemon CPU: {res['daemon_cpu_s_in_window']} s in the window = {res['daemon_cpu_pct']} % of a core,"
        f" {res['daemon_cpu_ms_per_status']} ms per status request ({res['daemon_cpu_s_total']} s since start);"
        f" RSS {mem['VmRSS']} MiB (peak {mem['VmHWM']} MiB)"
    )
    print(f"load average: start {res['load_avg_start']}, end {res['load_avg_end']}")
    print(f"target: busiest 1 s window <= {TARGET_RATIO:g}x the mean rate: {res['verdict']}")
    print(
        f"target: per-job interval / the intended one (median) within {INTERVAL_TOLERANCE:.0%} of 1:"
        f" {res['interval'].get('median_over_intended')}: {res['interval_verdict']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--poll-s", type=float, default=60.0)
    parser.add_argument("--max-poll-s", type=float, default=None, help="default: --poll-s (no age growth)")
    parser.add_argument("--age-s", type=float, default=0.0, help="how long before the run the jobs were uploaded")
    parser.add_argument("--seconds", type=float, default=180.0, help="how long to record (at least 3 poll periods)")
    parser.add_argument("--latency-s", type=float, default=0.05, help="the emulator's delay before every answer")
    parser.add_argument("--max-concurrent-polls", type=int, default=None, help="default: the daemon's default")
    parser.add_argument("--keep", type=Path, default=None, help="work in this (new) folder and keep it")
    args = parser.parse_args()
    if args.max_poll_s is None:
        args.max_poll_s = args.poll_s
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        res = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-polling-") as tmp:
            res = run(args, Path(tmp))
    report(res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
