"""A ledger of a million jobs: the CLI's `status`, `jobs` and `jobs --json`, daemon start and the tracker's query.

Run: .venv/bin/python bench/ledger_scale.py [--jobs 1000000] [--data-dir /var/tmp/ledger-scale] [--repeats 5]

The ledger is built once under --data-dir (its schema made by opening ``Ledger(path)``, so every migration runs; then
bulk INSERTs: jobs shaped like real ones, 11 events each as a real job's, most finished with their result downloaded,
a few hundred retraining, uploading, queued or failed, over several models) and reused while its job count matches;
a ledger of an older schema is migrated first (that time is reported). The CLI is measured as real subprocesses
(wall time, median of --repeats; `jobs --json` also its peak RSS, the kernel's VmHWM read from /proc while it
streams), the daemon start as `retrain-uploader run` on that ledger with the emulator (spawn -> `service.started` in
its log; the rows its first seconds change are restored after each run), the tracker's query in-process (the Ledger
method the tracker calls per round, median). Prints a table with PASS/FAIL against the targets and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from retrain_uploader.ledger import SCHEMA_VERSION, Ledger, State

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import vm_hwm_kib  # noqa: E402 -- bench/run.py's, beside this script

_BIN = Path(sys.executable).parent / "retrain-uploader"
COMMAND = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "retrain_uploader.cli"]
_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("RETRAIN_UPLOADER_CONFIG", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
}
_EMU = Path(__file__).resolve().parent / "_emu.py"
MODELS = 8
EVENTS_PER_JOB = 11
# The tail of the history: jobs the daemon still works on or follows (the newest ids), and failures spread over it.
RETRAINING, UPLOADING, QUEUED, FAILED, SWITCHED, RETRAIN_FAILED = 250, 20, 10, 150, 40, 30
TARGETS = {  # seconds, or MB for RSS
    "status_s": 1.0,
    "status_check_s": 1.0,
    "jobs_limit50_s": 1.0,
    "jobs_default_s": 1.0,
    "jobs_json_rss_mb": 100.0,
    "jobs_show_s": 1.0,
    "daemon_start_s": 2.0,
    "tracker_round_ms": 10.0,
    "tracker_due_ms": 10.0,
    "metrics_counts_ms": 10.0,
    "healthz_ms": 10.0,
}


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the ledger -------------------------------------------------------------------------------------------------------


def _job_rows(count: int, inboxes: list[str], start: float) -> Iterator[tuple[Any, ...]]:
    """One tuple per job, oldest first, shaped like the demo's jobs (a csv or a train/eval pair, a header, ids)."""
    tail = RETRAINING + UPLOADING + QUEUED
    failed_every = max(1, count // FAILED)
    header = json.dumps(["date", "store", "weather", "temperature_c", "promotion", "sales"])
    for i in range(1, count + 1):
        model = i % MODELS
        inbox = inboxes[model]
        created = start + i * 30.0
        pair = i % 5 == 0
        stem = f"sales-{i:07d}"
        sources = [f"{stem}.train.csv", f"{stem}.eval.csv"] if pair else [f"{stem}.csv"]
        upload = f"{stem}.zip" if pair else f"{stem}.csv"
        sha = secrets.token_hex(32)
        content = secrets.token_hex(32) if pair else sha
        ids = {name: [65024, 2000000 + i, 6034, int(created * 1e9), int(created * 1e9)] for name in sources}
        left = count - i  # 0 for the newest job
        closed, moved, result, retrain_status, error = 1, [f"done/{s}" for s in sources], None, "job_finished", None
        state = State.FINISHED
        result = f"done/{stem}.result.zip"
        if left < QUEUED:
            state, closed, moved, result, retrain_status = State.QUEUED, 0, [], None, None
        elif left < QUEUED + UPLOADING:
            state, closed, moved, result, retrain_status = State.UPLOADING, 0, [], None, None
        elif left < tail:
            state, result, retrain_status = State.RETRAINING, None, "retraining"
        elif i % failed_every == 0:
            state, moved, result, retrain_status = State.FAILED, [f"failed/{s}" for s in sources], None, None
            error = "upload_url: HTTP 400 invalid_parameter: the file is not a CSV the model was trained on"
        elif left < tail + SWITCHED or model == 0:  # model-00 switches to every retrained model (auto_switch)
            state = State.SWITCHED
        elif left < tail + SWITCHED + RETRAIN_FAILED:
            state, result, retrain_status = State.RETRAIN_FAILED, None, "job_failed"
        uploaded = None if state in (State.QUEUED, State.UPLOADING, State.FAILED) else _iso(created + 0.02)
        yield (
            i, f"model-{model:02d}", "pair" if pair else "csv", stem, json.dumps(sources), upload, str(state), sha,
            content, 6034, None, None if state is State.QUEUED else str(uuid.uuid4()), "waiting_for_upload",
            int(state is State.UPLOADING), 0, error, json.dumps(moved), closed, _iso(created), _iso(created + 2.0),
            uploaded, retrain_status, None, 101 if retrain_status == "job_finished" else None, result,
            _iso(created + 3.0) if state is State.SWITCHED else None, inbox, json.dumps(ids), None,
            6034 if uploaded else None, header, None,
        )


# The 11 events of a real job (from a demo run), built in SQL from its row: created, packaging, packaged, requesting,
# upload_url, uploading, uploaded, closed, retraining, finished, result_downloaded.
_EVENTS_SQL = """
WITH kinds(n, event) AS (VALUES (1, 'created'), (2, 'state'), (3, 'packaged'), (4, 'state'), (5, 'upload_url'),
    (6, 'state'), (7, 'uploaded'), (8, 'closed'), (9, 'retrain_status'), (10, 'retrain_status'),
    (11, 'result_downloaded'))
INSERT INTO job_events (job_id, at, event, detail)
SELECT j.id, CASE WHEN k.n < 7 THEN j.created_at WHEN k.n < 10 THEN coalesce(j.uploaded_at, j.updated_at)
                  ELSE j.updated_at END,
       k.event,
       CASE k.n
         WHEN 1 THEN json_object('sources', json(j.sources))
         WHEN 2 THEN json_object('state', 'packaging')
         WHEN 3 THEN json_object('sha256', j.sha256, 'size_bytes', j.size_bytes, 'sources', json(j.source_ids))
         WHEN 4 THEN json_object('state', 'requesting')
         WHEN 5 THEN json_object('retrain_job_id', j.retrain_job_id, 'abandoned', NULL)
         WHEN 6 THEN json_object('state', 'uploading', 'status_before_put', 'waiting_for_upload')
         WHEN 7 THEN json_object('confirmed_by_status', json('false'))
         WHEN 8 THEN json_object('moved_to', json(j.moved_to), 'replaced', NULL)
         WHEN 9 THEN json_object('status', 'retraining', 'message', NULL)
         WHEN 10 THEN json_object('status', j.retrain_status, 'message', NULL)
         ELSE json_object('path', j.result_path, 'size_bytes', 197)
       END
FROM jobs j JOIN kinds k
WHERE j.id BETWEEN ? AND ?
  AND (k.n = 1 OR j.state != 'queued')
  AND (k.n <= 6 OR j.state NOT IN ('queued', 'uploading'))
  AND (k.n <= 8 OR j.state NOT IN ('failed'))
  AND (k.n <= 9 OR j.state NOT IN ('retraining'))
  AND (k.n <= 10 OR j.result_path IS NOT NULL)
ORDER BY j.id, k.n
"""


def build_ledger(path: Path, count: int, inboxes: list[str]) -> float:
    """A ledger of ``count`` jobs at ``path`` (replacing any); returns the seconds it took."""
    started = time.monotonic()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    Ledger(path).close()  # the real schema: every migration
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-262144")
    columns = (
        "id, model, kind, name, sources, upload_filename, state, sha256, content_sha256, size_bytes, package_path,"
        " retrain_job_id, status_before_put, put_started, attempts, error, moved_to, closed, created_at, updated_at,"
        " uploaded_at, retrain_status, retrain_message, model_id, result_path, switched_at, inbox, source_ids,"
        " outcome_unknown_since, bytes_sent, header, watched_s"
    )
    insert = f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * len(columns.split(',')))})"
    rows = _job_rows(count, inboxes, time.time() - count * 30.0 - 3600)
    batch = 50_000
    for low in range(1, count + 1, batch):
        high = min(count, low + batch - 1)
        db.execute("BEGIN")
        db.executemany(insert, (next(rows) for _ in range(high - low + 1)))
        db.execute(_EVENTS_SQL, (low, high))
        db.execute("COMMIT")
        print(f"\r  built {high:,} of {count:,} jobs", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    last = {f"model-{m:02d}": _iso(time.time() - 600) for m in range(MODELS)}
    db.executemany("INSERT OR REPLACE INTO models (name, last_success_at) VALUES (?, ?)", last.items())
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.monotonic() - started


# -- the set-up ---------------------------------------------------------------------------------------------------


def write_config(data: Path, base_url: str, metrics_port: int | None = None) -> Path:
    lines = [
        "[api]", f'base_url = "{base_url}"', "",
        "[ledger]", f'path = "{data / "state" / "ledger.sqlite3"}"', "",
        "[watch]", "settle_s = 0.5", "rescan_s = 60", "",
        "[pool]", "workers = 4", "",
        "[status]", "poll_s = 3600", "",
    ]
    if metrics_port is not None:
        lines += ["[metrics]", "enabled = true", f"port = {metrics_port}", ""]
    (data / "keys").mkdir(exist_ok=True)
    for m in range(MODELS):
        name = f"model-{m:02d}"
        key = data / "keys" / name
        key.write_text(f"bench-key-{m:04d}\n")
        key.chmod(0o600)
        (data / "inbox" / name).mkdir(parents=True, exist_ok=True)
        lines += ["[[models]]", f'name = "{name}"', f'inbox = "{data / "inbox" / name}"', f'api_key_file = "{key}"']
        if m == 0:
            lines.append("auto_switch = true")
        lines.append("")
    path = data / "config.toml"
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def _wall(args: list[str], config: Path) -> float:
    started = time.monotonic()
    done = subprocess.run([*COMMAND, *args, "--config", str(config)], env=_ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    took = time.monotonic() - started
    allowed = (0, 1, 2) if "--check" in args else (0,)  # status --check: a failed job is a WARNING, no daemon CRITICAL
    if done.returncode not in allowed:
        raise RuntimeError(f"{args}: exit {done.returncode}: {done.stderr.decode()[-2000:]}")
    return took


def jobs_json(config: Path) -> dict[str, float]:
    """`jobs --json` over the whole ledger: wall time, lines, and its peak RSS (VmHWM, read every 10 ms)."""
    started = time.monotonic()
    proc = subprocess.Popen([*COMMAND, "jobs", "--json", "--config", str(config)], env=_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            kb = vm_hwm_kib(proc.pid)
            if kb is not None:
                peak[0] = max(peak[0], kb)
            stop.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines = 0
    assert proc.stdout is not None
    for chunk in iter(lambda: proc.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
        lines += chunk.count(b"\n")
        kb = vm_hwm_kib(proc.pid)
        if kb is not None:
            peak[0] = max(peak[0], kb)
    proc.wait()
    stop.set()
    watcher.join()
    return {"s": time.monotonic() - started, "lines": lines, "rss_mb": peak[0] / 1024}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tracked_rows(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, int]:
    """What a daemon's first seconds may change: the open and followed jobs, the models, and the id high-water marks."""
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    jobs = [dict(r) for r in db.execute(
        "SELECT * FROM jobs WHERE id > (SELECT max(id) FROM jobs) - ?", (RETRAINING + UPLOADING + QUEUED + 500,)
    )]
    models = [dict(r) for r in db.execute("SELECT * FROM models")]
    top_job = int(db.execute("SELECT max(id) FROM jobs").fetchone()[0])
    top_event = int(db.execute("SELECT max(id) FROM job_events").fetchone()[0])
    db.close()
    return jobs, models, top_job, top_event


def _restore(path: Path, saved: tuple[list[dict[str, Any]], list[dict[str, Any]], int, int]) -> None:
    jobs, models, top_job, top_event = saved
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    db.execute("DELETE FROM job_events WHERE id > ?", (top_event,))
    db.execute("DELETE FROM jobs WHERE id > ?", (top_job,))
    for row in jobs:
        keys = list(row)
        db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                   list(row.values()))
    db.execute("DELETE FROM models")
    for row in models:
        keys = list(row)
        db.execute(f"INSERT INTO models ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                   list(row.values()))
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def _get_ms(url: str) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=30) as answer:  # noqa: S310 -- a loopback URL built here
        answer.read()
    return (time.monotonic() - started) * 1000


def daemon_start(data: Path, repeats: int) -> dict[str, list[float]]:
    """`retrain-uploader run` on the ledger: spawn -> `service.started`; then /healthz and /metrics on it."""
    ledger = data / "state" / "ledger.sqlite3"
    emu = subprocess.Popen(
        [sys.executable, str(_EMU), *(f"--key=bench-key-{m:04d}={m + 1}" for m in range(MODELS))],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_ENV, text=True,
    )
    out: dict[str, list[float]] = {"start_s": [], "healthz_ms": [], "metrics_ms": []}
    try:
        assert emu.stdout is not None
        ready = emu.stdout.readline().split()
        if ready[:1] != ["READY"]:
            raise RuntimeError(f"the emulator did not start: {ready}")
        for run in range(repeats):
            port = _free_port()
            config = write_config(data, ready[1], metrics_port=port)
            saved = _tracked_rows(ledger)
            log_path = data / f"daemon-{run}.log"
            env = {**_ENV, "RETRAIN_UPLOADER_LOG_LEVEL": "info"}
            with open(log_path, "wb") as log:
                started = time.monotonic()
                proc = subprocess.Popen([*COMMAND, "run", "--config", str(config)], env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
            try:
                took = _wait_started(proc, log_path, started)
                out["start_s"].append(took)
                out["healthz_ms"] += [_get_ms(f"http://127.0.0.1:{port}/healthz") for _ in range(5)]
                out["metrics_ms"] += [_get_ms(f"http://127.0.0.1:{port}/metrics") for _ in range(3)]
            finally:
                proc.terminate()
                proc.wait(timeout=60)
                _restore(ledger, saved)
    finally:
        emu.terminate()
        emu.wait(timeout=30)
    return out


def _wait_started(proc: subprocess.Popen[bytes], log_path: Path, started: float) -> float:
    seen = 0
    while time.monotonic() - started < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited {proc.returncode}: {log_path.read_text()[-3000:]}")
        text = log_path.read_bytes()
        if b'"service.started"' in text[seen:]:
            return time.monotonic() - started
        seen = max(0, len(text) - 64)
        time.sleep(0.005)
    raise RuntimeError("the daemon did not start in 120 s")


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def in_process(path: Path, repeats: int) -> dict[str, float]:
    """The queries the daemon runs on its event loop, timed on a connection like the daemon's."""
    with Ledger(path) as ledger:
        auto = ["model-00"]
        full = ledger.tracked(download=True, auto_switch_models=auto)
        ids = [job.id for job in full][:500]
        return {
            "tracked_jobs": len(full),
            "tracker_round_ms": _median_ms(
                lambda: ledger.tracked_rows(download=True, auto_switch_models=auto), repeats
            ),
            "tracker_round_whole_jobs_ms": _median_ms(
                lambda: ledger.tracked(download=True, auto_switch_models=auto), repeats
            ),
            "tracker_due_ms": _median_ms(
                lambda: ledger.tracked(download=True, auto_switch_models=auto, ids=ids), repeats
            ),
            "metrics_counts_ms": _median_ms(ledger.counts, repeats),
            "unfinished_ms": _median_ms(ledger.unfinished, repeats),
        }


# -- the run ------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/retrain-uploader-ledger-scale"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="build the ledger again even if one is there")
    parser.add_argument("--skip-json", action="store_true", help="leave out `jobs --json` (the longest step)")
    args = parser.parse_args()
    data: Path = args.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    ledger = data / "state" / "ledger.sqlite3"
    ledger.parent.mkdir(exist_ok=True)
    marker = data / "ledger.json"
    figures: dict[str, Any] = {"jobs": args.jobs, "schema": SCHEMA_VERSION, "load_at_start": os.getloadavg()[0]}
    config = write_config(data, "http://127.0.0.1:9")
    inboxes = [str(data / "inbox" / f"model-{m:02d}") for m in range(MODELS)]
    built = json.loads(marker.read_text()) if marker.exists() and ledger.exists() else {}
    if args.rebuild or built.get("jobs") != args.jobs:
        print(f"building a ledger of {args.jobs:,} jobs in {ledger}", file=sys.stderr)
        figures["build_s"] = round(build_ledger(ledger, args.jobs, inboxes), 1)
        marker.write_text(json.dumps({"jobs": args.jobs}))
    db = sqlite3.connect(ledger)
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    db.close()
    if version != SCHEMA_VERSION:  # built by an older version: migrate it once, as a daemon start would
        started = time.monotonic()
        Ledger(ledger).close()
        figures["migration_s"] = round(time.monotonic() - started, 2)
    figures["ledger_mb"] = round(ledger.stat().st_size / 2**20)
    mid = args.jobs // 2
    wall = {
        "status_s": ["status"],
        "status_check_s": ["status", "--check"],
        "jobs_limit50_s": ["jobs", "--limit", "50"],
        "jobs_default_s": ["jobs"],
        "jobs_show_s": ["jobs", "show", str(mid)],
    }
    for name, command in wall.items():
        runs = [_wall(command, config) for _ in range(args.repeats)]
        figures[name] = statistics.median(runs)
        figures[name + "_runs"] = [round(r, 3) for r in runs]
    if not args.skip_json:
        streamed = [jobs_json(config) for _ in range(max(1, args.repeats // 2))]
        figures["jobs_json_s"] = statistics.median(r["s"] for r in streamed)
        figures["jobs_json_lines"] = streamed[0]["lines"]
        figures["jobs_json_rss_mb"] = statistics.median(r["rss_mb"] for r in streamed)
    figures.update(in_process(ledger, max(21, args.repeats)))
    started = daemon_start(data, args.repeats)
    figures["daemon_start_s"] = statistics.median(started["start_s"])
    figures["daemon_start_runs"] = [round(r, 3) for r in started["start_s"]]
    figures["healthz_ms"] = statistics.median(started["healthz_ms"])
    figures["metrics_ms"] = statistics.median(started["metrics_ms"])
    figures["load_at_end"] = os.getloadavg()[0]
    _report(figures)
    return 0


def _report(figures: dict[str, Any]) -> None:
    print(f"\nledger: {figures['jobs']:,} jobs, {figures['ledger_mb']} MiB, schema {figures['schema']}"
          f"{', migrated in %.2f s' % figures['migration_s'] if 'migration_s' in figures else ''}")
    print(f"{'what':<22} {'median':>12} {'target':>10}  verdict")
    for name, target in TARGETS.items():
        if name not in figures:
            continue
        value = figures[name]
        unit = "MB" if name.endswith("_mb") else "ms" if name.endswith("_ms") else "s"
        verdict = "PASS" if value < target else "FAIL"
        print(f"{name:<22} {value:>10.3f} {unit:<2} {'< %g' % target:>9}  {verdict}")
    for name in ("jobs_json_s", "jobs_json_lines", "metrics_ms", "unfinished_ms", "tracked_jobs"):
        if name in figures:
            print(f"{name:<22} {figures[name]:>10.3f}    (no target)")
    verdicts = {n: figures[n] < t for n, t in TARGETS.items() if n in figures}
    print(json.dumps({**figures, "pass": verdicts}, default=str))


if __name__ == "__main__":
    sys.exit(main())
