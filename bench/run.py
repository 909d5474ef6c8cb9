#!/usr/bin/env python3
"""retrain-uploader benchmark: the real daemon against the emulator on loopback, side by side with curl,
the API manual's requests flow and Info-ZIP, in one run.

    .venv/bin/python bench/run.py [--size-mb N] [--small-files N] [--quick] [--repeats N] [--data-dir DIR]

Sections (see bench/README.md for what each one means and the numbers measured):
  1. one large CSV: the daemon (a subprocess: `retrain-uploader run`) from drop to done/, split into its
     check+hash and upload phases, vs `curl -T` and the requests reference flow; time and peak RSS of each
  2. a train + eval pair: package_pair at deflate level 1 and 6 vs `zip -1` / `zip -6`; upload time saved
  3. many small files with 50 ms API latency and 8 workers: drain time vs the ideal
  4. event-loop lag while a large pair is checked, zipped and uploaded (service in-process)
  5. drop-to-first-request latency for a small file with settle_s = 1
  6. the bandwidth cap's accuracy: `[upload] max_bytes_per_s` over a ~30 s upload, one file and four in parallel,
     measured on the server's side

The emulator always runs in a process of its own (it hashes every PUT body), except in section 5, where it
only answers one small request per file. Prints a table, PASS/FAIL per target, then one JSON line with every
figure. Exit code 0 unless a section crashed (then 1).
"""

# ruff: noqa: S603, S607  -- the bench starts our own programs and curl/zip from PATH with fixed arguments

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import platform
import pstats
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _data  # noqa: E402

KEY = "bench-key-0001"
MiB = 1 << 20
MBIT = 1_000_000


# -- small utilities ----------------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set of a live process (VmHWM), in KiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """CPU time (user + system, all threads) a live process has used so far, in seconds; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def children_cpu_s() -> float:
    """CPU time of the children reaped so far (a finished curl's, taken as a difference around its run)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class PeakRss:
    """Polls /proc/PID/status VmHWM (a high-water mark kept by the kernel) until stopped or the process exits.

    VmHWM belongs to the process's own address space, so unlike ru_maxrss it does not inherit the RSS of the
    parent that forked it. The last successful read is the peak up to within one polling interval.
    """

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid, self.kib = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)
        self._thread.start()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.is_set():
            value = vm_hwm_kib(self.pid)
            if value is None:
                return
            self.kib = max(self.kib, value)
            time.sleep(interval_s)

    def sample(self) -> int:
        value = vm_hwm_kib(self.pid)
        if value is not None:
            self.kib = max(self.kib, value)
        return self.kib

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.kib / 1024  # MiB


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def daemon_command() -> list[str]:
    script = Path(sys.executable).with_name("retrain-uploader")
    return [str(script)] if script.exists() else [sys.executable, "-m", "retrain_uploader.cli"]


def place(src: Path, inbox: Path, name: str) -> Path:
    """Hard-link ``src`` under a hidden name in the inbox, ready to be renamed in (no copy, same inode)."""
    hidden = inbox / f".{name}.incoming"
    hidden.unlink(missing_ok=True)
    os.link(src, hidden)
    return hidden


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_total": mem, "python": platform.python_version(),
            "kernel": platform.release()}


# -- the emulator in its own process ------------------------------------------------------------------------------
class EmulatorProcess:
    def __init__(self, *, latency_s: float = 0.0, retrain_s: float = 3600.0) -> None:
        cmd = [sys.executable, str(HERE / "_emu.py"), "--key", f"{KEY}=1", "--latency-s", str(latency_s),
               "--retrain-s", str(retrain_s)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.base_url = line.split()[1]

    def requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.base_url}/_emulator/requests", timeout=30) as resp:  # noqa: S310
            return list(json.load(resp))

    def uploads(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.base_url}/_emulator/uploads", timeout=30) as resp:  # noqa: S310
            return list(json.load(resp))

    def upload_url(self, filename: str) -> str:
        query = urllib.parse.urlencode({"filename": filename})
        req = urllib.request.Request(  # noqa: S310
            f"{self.base_url}/v1/external/retrain_jobs/upload_url?{query}", headers={"x-api-key": KEY}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return str(json.load(resp)["upload_url"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def write_key(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    return key_file


def settings_mapping(root: Path, base_url: str, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "api": {"base_url": base_url},
        "ledger": {"path": str(root / "state" / "ledger.sqlite3"), "staging_dir": str(root / "staging")},
        "status": {"poll_s": 3600, "download_result": False},
        "models": [{"name": "bench", "inbox": str(root / "inbox"), "api_key_file": str(write_key(root / "keys"))}],
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def to_toml(raw: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    lines: list[str] = []
    for section, values in raw.items():
        if section == "models":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items()]
    for model in raw["models"]:
        lines.append("[[models]]")
        lines += [f"{k} = {value(v)}" for k, v in model.items()]
    return "\n".join(lines) + "\n"


# -- structlog in-process: JSON lines to a file (as in production), plus event timestamps for the bench -------------
class EventRecorder:
    """A structlog processor that timestamps (monotonic) the events the bench waits for."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        self.events[str(event_dict.get("event"))].append((time.monotonic(), dict(event_dict)))
        return event_dict

    def count(self, event: str) -> int:
        return len(self.events.get(event, ()))

    async def wait_count(self, event: str, n: int, timeout: float) -> float:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while self.count(event) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count(event)}/{n} {event} after {timeout:g} s")
            # The time taken is the event's own (recorded above); this only notices it. Not every 5 ms: those wake-ups
            # were counted as the daemon's CPU (about 0.07 ms per file at 2,000 files).
            await asyncio.sleep(0.05)
        return self.events[event][n - 1][0]


@contextlib.contextmanager
def in_process_logging(path: Path) -> Iterator[EventRecorder]:
    import structlog

    from retrain_uploader.logs import configure

    recorder = EventRecorder()
    with open(path, "w", encoding="utf-8") as stream:
        configure(level="info", json_lines=True, stream=stream)
        structlog.configure(processors=[recorder, *structlog.get_config()["processors"]])
        try:
            yield recorder
        finally:
            structlog.reset_defaults()
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))


async def start_service(raw: dict[str, Any]) -> tuple[Any, asyncio.Task[int]]:
    from retrain_uploader.config import Settings
    from retrain_uploader.service import Service

    service = Service(Settings.from_mapping(raw), handle_signals=False)
    task = asyncio.create_task(service.run())
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    return service, task


async def stop_service(service: Any, task: asyncio.Task[int]) -> None:
    service.request_stop()
    await asyncio.wait_for(task, timeout=60)


def check_ledger(raw: dict[str, Any], expect: int) -> dict[str, int]:
    from retrain_uploader.ledger import Ledger

    with Ledger(Path(raw["ledger"]["path"])) as ledger:
        jobs = ledger.jobs()
    states: dict[str, int] = defaultdict(int)
    for job in jobs:
        states[str(job.state)] += 1
    if len(jobs) != expect or not all(j.closed for j in jobs):
        raise RuntimeError(f"expected {expect} closed jobs, ledger has {dict(states)}")
    return dict(states)


# -- section 1: one large CSV ---------------------------------------------------------------------------------------
def parse_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


def daemon_once(work: Path, emu: EmulatorProcess, src: Path, settle_s: float,
                **sections: dict[str, Any]) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    raw = settings_mapping(work, emu.base_url, watch={"settle_s": settle_s}, **sections)
    cfg = work / "config.toml"
    cfg.write_text(to_toml(raw))
    cfg.chmod(0o600)
    inbox = work / "inbox"
    inbox.mkdir(parents=True)
    log_path = work / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*daemon_command(), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=log, stdin=subprocess.DEVNULL)
    rss = PeakRss(proc.pid)
    try:
        wait_until(lambda: "service.started" in log_path.read_text(errors="replace") or proc.poll() is not None,
                   60, "the daemon to start", 0.02)
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        # "service.started" is logged a moment before the inbox watch exists: a file renamed in within those few
        # milliseconds is found only by the periodic rescan (60 s). Not what this section measures: wait it out.
        time.sleep(0.5)
        rss_idle = rss.sample() / 1024
        hidden = place(src, inbox, src.name)
        cpu0 = cpu_s(proc.pid) or 0.0
        done = inbox / "done" / src.name
        t0 = time.monotonic()
        os.rename(hidden, inbox / src.name)
        wait_until(lambda: done.exists() or proc.poll() is not None, 600, "done/")
        t_done = time.monotonic()
        cpu = (cpu_s(proc.pid) or float("nan")) - cpu0  # the CPU the daemon spent from the drop to done/
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}")
        rss.sample()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        peak = rss.stop()
    events = {e.get("event"): e for e in parse_log(log_path)}
    if "upload.finished" not in events or "job.packaged" not in events:
        raise RuntimeError(f"daemon log lacks the expected events: {sorted(str(k) for k in events)}")
    size = int(events["job.packaged"]["size_bytes"])
    # One pass: a large CSV is only hashed at packaging ("job.hashed" logged); its check runs inside the PUT.
    check_s = float(events["job.packaged"]["duration_s"])
    upload_s = float(events["upload.finished"]["duration_s"])
    (inbox / "done" / src.name).unlink(missing_ok=True)
    return {"drop_to_done_s": t_done - t0, "check_hash_s": check_s, "upload_s": upload_s, "size_bytes": size,
            "one_pass": "job.hashed" in events, "net_s": t_done - t0 - settle_s, "cpu_s": cpu,
            "peak_rss_mib": peak, "idle_rss_mib": rss_idle, "exit_code": proc.returncode}


def curl_once(emu: EmulatorProcess, src: Path, limit_b_s: int | None = None) -> dict[str, Any]:
    url = emu.upload_url(src.name)
    limit = [] if limit_b_s is None else ["--limit-rate", str(limit_b_s)]
    cpu0 = children_cpu_s()
    t0 = time.monotonic()
    proc = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", *limit,
                             "-T", str(src), url], stdout=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid, 0.002)
    out, _ = proc.communicate(timeout=600)
    wall = time.monotonic() - t0
    peak = rss.stop()
    code, total = out.split()
    if code != "200":
        raise RuntimeError(f"curl PUT answered {code}")
    return {"time_s": float(total), "wall_s": wall, "peak_rss_mib": peak, "cpu_s": children_cpu_s() - cpu0}


def reference_once(emu: EmulatorProcess, src: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / "_reference.py"), emu.base_url, KEY, str(src)],
                            stdout=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    out, _ = proc.communicate(timeout=600)
    wall = time.monotonic() - t0
    polled = rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"reference flow exited {proc.returncode}")
    data = json.loads(out.strip().splitlines()[-1])
    if data["status"] != 200:
        raise RuntimeError(f"reference PUT answered {data['status']}")
    return {"time_s": data["total_s"], "put_s": data["put_s"], "read_s": data["read_s"], "wall_s": wall,
            "peak_rss_mib": max(polled, data["vm_hwm_kib"] / 1024)}


def section_large(args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    src = data / ("big.numeric.csv" if args.large == "numeric" else "big.csv")
    size = src.stat().st_size
    out: dict[str, Any] = {"file_mib": size / MiB, "settle_s": 0.1, "kind": args.large, "two_pass": args.two_pass}
    have_requests = subprocess.run([sys.executable, "-c", "import requests"], capture_output=True).returncode == 0
    have_curl = shutil.which("curl") is not None
    with EmulatorProcess() as emu:
        runs: dict[str, list[dict[str, Any]]] = {"daemon": [], "curl": [], "reference": []}
        # Interleaved, so a burst of load elsewhere hits all three alike. Loopback throughput is the noisiest
        # figure on a shared machine, so the daemon/curl pair runs two more times than the rest.
        pairs = args.repeats + 2
        for i in range(pairs):
            two_pass = {"packaging": {"stream_check_min_bytes": 1 << 62}} if args.two_pass else {}
            runs["daemon"].append(daemon_once(work / "daemon", emu, src, settle_s=0.1, **two_pass))
            if have_curl:
                runs["curl"].append(curl_once(emu, src))
            if have_requests and i < args.repeats:
                runs["reference"].append(reference_once(emu, src))
            print(f"  [1] repeat {i + 1}/{pairs} done", flush=True)
        uploads = emu.uploads()
    if any(u["size"] != size for u in uploads):
        raise RuntimeError("an upload arrived with the wrong size")
    d = runs["daemon"]
    out["daemon"] = {
        "drop_to_done_s": median([r["drop_to_done_s"] for r in d]),
        "check_hash_s": median([r["check_hash_s"] for r in d]),
        "upload_s": median([r["upload_s"] for r in d]),
        "check_hash_mib_s": median([size / MiB / r["check_hash_s"] for r in d]),
        "one_pass": all(r["one_pass"] for r in d),
        "upload_mib_s": median([size / MiB / r["upload_s"] for r in d]),
        "upload_mib_s_range": [min(size / MiB / r["upload_s"] for r in d), max(size / MiB / r["upload_s"] for r in d)],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in d),
        "idle_rss_mib": max(r["idle_rss_mib"] for r in d),
        "cpu_s": median([r["cpu_s"] for r in d]),
        "runs": d,
    }
    if runs["curl"]:
        c = runs["curl"]
        speeds = [size / MiB / r["time_s"] for r in c]
        out["curl"] = {"time_s": median([r["time_s"] for r in c]), "mib_s": median(speeds),
                       "mib_s_range": [min(speeds), max(speeds)], "peak_rss_mib": max(r["peak_rss_mib"] for r in c),
                       "cpu_s": median([r["cpu_s"] for r in c]), "runs": c}
        # Each daemon upload is paired with the curl run right after it (same load on the machine): the median of
        # those ratios is the figure judged; the ratio of the two medians is shown too.
        pairs = [r["time_s"] / dr["upload_s"] for dr, r in zip(d, c, strict=True)]
        out["upload_vs_curl"] = median(pairs)
        out["upload_vs_curl_pairs"] = pairs
        out["upload_vs_curl_of_medians"] = out["daemon"]["upload_mib_s"] / out["curl"]["mib_s"]
        # Drop to done/ less the settle time, against curl's upload of the same file (paired runs, median).
        done_pairs = [dr["net_s"] / r["time_s"] for dr, r in zip(d, c, strict=True)]
        out["done_vs_curl"] = median(done_pairs)
        out["done_vs_curl_pairs"] = done_pairs
    else:
        out["curl"] = {"skipped": "curl not found (apt-get install curl)"}
    if runs["reference"]:
        r_ = runs["reference"]
        out["reference"] = {"time_s": median([r["time_s"] for r in r_]),
                            "put_mib_s": median([size / MiB / r["put_s"] for r in r_]),
                            "peak_rss_mib": max(r["peak_rss_mib"] for r in r_), "runs": r_}
    else:
        out["reference"] = {"skipped": "requests not installed (.venv/bin/pip install requests)"}
    return out


# -- section 2: packaging a pair ------------------------------------------------------------------------------------
def section_packaging(args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    from retrain_uploader.packager import package_pair

    train, eval_ = data / "train_src" / "pair.train.csv", data / "eval_src" / "pair.eval.csv"
    raw_bytes = train.stat().st_size + eval_.stat().st_size
    staging = work / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    have_zip = shutil.which("zip") is not None
    results: dict[str, dict[str, Any]] = {}

    def record(name: str, times: list[float], size: int) -> None:
        t = median(times)
        row: dict[str, Any] = {"time_s": t, "mib_s": raw_bytes / MiB / t, "zip_mib": size / MiB,
                               "ratio": size / raw_bytes, "runs_s": times}
        for mbit in (10, 100):
            raw_up = raw_bytes * 8 / (mbit * MBIT)
            zip_up = size * 8 / (mbit * MBIT)
            row[f"total_{mbit}mbit_s"] = t + zip_up  # packaging, then sending the zip
            row[f"saved_{mbit}mbit_s"] = raw_up - zip_up - t  # vs sending the raw bytes with no packaging at all
        results[name] = row

    for level in (1, 6, 0):
        repeats = args.repeats if level else 1  # level 0 (stored): one run, for reference only
        times, size = [], 0
        for r in range(repeats):
            t0 = time.perf_counter()
            pkg = package_pair("pair", train, eval_, staging, job_id=r, level=level)
            times.append(time.perf_counter() - t0)
            size = pkg.size_bytes
            pkg.path.unlink()
        record(f"daemon_level{level}", times, size)
        print(f"  [2] package_pair level {level}: {median(times):.2f} s", flush=True)
        if have_zip and level:
            times = []
            target = staging / "zip.zip"
            for _ in range(repeats):
                target.unlink(missing_ok=True)
                t0 = time.perf_counter()
                subprocess.run(["zip", "-q", f"-{level}", str(target), "train_src/pair.train.csv",
                                "eval_src/pair.eval.csv"], cwd=data, check=True)
                times.append(time.perf_counter() - t0)
                size = target.stat().st_size
            target.unlink()
            record(f"zip_{level}", times, size)
            print(f"  [2] zip -{level}: {median(times):.2f} s", flush=True)
    out: dict[str, Any] = {"train_mib": train.stat().st_size / MiB, "eval_mib": eval_.stat().st_size / MiB,
                           "raw_mib": raw_bytes / MiB, **results}
    if not have_zip:
        out["zip"] = {"skipped": "zip not found (apt-get install zip)"}
    best = {}
    for mbit in (10, 100):
        choices = {lvl: results[f"daemon_level{lvl}"][f"total_{mbit}mbit_s"] for lvl in (0, 1, 6)}
        best[f"{mbit}mbit"] = min(choices, key=lambda k: choices[k])
    out["fastest_level"] = best
    return out


# -- section 3: many small files -----------------------------------------------------------------------------------
def step_medians(rec: EventRecorder) -> dict[str, float]:
    """Per-job time between consecutive log events (median, ms): where each job's time goes."""
    at: dict[Any, dict[str, float]] = defaultdict(dict)
    for name in ("job.queued", "job.packaged", "upload.url_received", "upload.started", "upload.finished",
                 "job.closed"):
        for t, ev in rec.events.get(name, ()):
            at[ev.get("job_id")].setdefault(name, t)
    out = {}
    for a, b, label in (("job.queued", "job.packaged", "queued->packaged (incl. waiting for a worker)"),
                        ("job.packaged", "upload.url_received", "upload_url call"),
                        ("upload.url_received", "upload.started", "status baseline call"),
                        ("upload.started", "upload.finished", "PUT"),
                        ("upload.finished", "job.closed", "move to done/ + close")):
        xs = [1000 * (j[b] - j[a]) for j in at.values() if a in j and b in j]
        out[label] = round(median(xs), 1)
    durations = [1000 * float(ev["duration_s"]) for _, ev in rec.events.get("job.packaged", ())]
    out["check+hash (job.packaged duration_s)"] = round(median(durations), 1)
    return out


def commit_counter(ledger: Any) -> Callable[[], int]:
    """Reads the ledger's COMMITs so far: the daemon's only writer counts its own (a trace callback on every statement
    was counted as the daemon's CPU, ~0.05 ms per file). A daemon from before session 6 (compared side by side with
    PYTHONPATH) has no counter: it gets the trace callback, and its cost."""
    if hasattr(ledger, "commits"):
        return lambda: int(ledger.commits)
    counted = [0]

    def trace(sql: str) -> None:
        if sql == "COMMIT":
            counted[0] += 1

    ledger._db.set_trace_callback(trace)
    return lambda: counted[0]


async def section_small_files(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n, workers, latency = args.small_files, 8, 0.05
    shutil.rmtree(work, ignore_errors=True)
    with EmulatorProcess(latency_s=latency) as emu:
        raw = settings_mapping(work, emu.base_url, watch={"settle_s": 0.05}, pool={"workers": workers})
        incoming = work / "incoming"
        incoming.mkdir(parents=True)
        names = [f"small{i:05d}.csv" for i in range(n)]
        for i, name in enumerate(names):
            (incoming / name).write_bytes(_data.small_csv(i))
        with in_process_logging(work / "service.log") as rec:
            service, task = await start_service(raw)
            inbox = work / "inbox"
            commits = commit_counter(service.ledger)
            commits0 = commits()
            # CPU time, not wall time: a commit's fsync blocks the loop but costs no CPU.
            profiler = cProfile.Profile(time.process_time) if args.profile else None
            try:
                t0 = time.monotonic()
                cpu0, times0 = time.process_time(), os.times()
                if profiler is not None:
                    profiler.enable()
                for name in names:
                    os.rename(incoming / name, inbox / name)
                t_dropped = time.monotonic()
                t_end = await rec.wait_count("job.closed", n, timeout=max(120.0, n * 0.2))
                cpu, times1 = time.process_time() - cpu0, os.times()
                committed = commits() - commits0
                if profiler is not None:
                    profiler.disable()
                first_url = rec.events["upload.url_received"][0][0]
                steps = step_medians(rec)
            finally:
                await stop_service(service, task)
        if profiler is not None:
            profiler.dump_stats(str(args.profile))
            pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(25)
        states = check_ledger(raw, n)
        requests = [r for r in emu.requests() if r["endpoint"] != "other"]
    per: dict[str, int] = defaultdict(int)
    for r in requests:
        per[r["endpoint"]] += 1
    worker_path = per["upload_url"] + per["put"] + min(per["status"], n)  # status baseline: one per job
    per_file = worker_path / n
    ideal = n * per_file * latency / workers
    drain = t_end - t0
    return {"files": n, "workers": workers, "latency_s": latency, "settle_s": 0.05, "drop_s": t_dropped - t0,
            "drain_s": drain, "ideal_s": ideal, "ratio": drain / ideal, "requests": dict(per),
            "requests_per_file_worker_path": per_file, "requests_per_file_total": len(requests) / n,
            "first_request_after_s": first_url - t0, "states": states, "step_median_ms": steps,
            "cpu_ms_per_file": 1000 * cpu / n, "commits_per_job": committed / n,
            "cpu_user_ms_per_file": 1000 * (times1.user - times0.user) / n,
            "cpu_system_ms_per_file": 1000 * (times1.system - times0.system) / n,
            "note": "status counts the baseline (1/job, worker path); a job's first check comes one poll_s after its "
                    "upload and poll_s=3600, so no check follows within the drain"}


# -- section 4: event-loop lag --------------------------------------------------------------------------------------
async def section_lag(args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.01)
            end = time.monotonic()
            samples.append((end, end - t - 0.01))  # filed under when the loop came back

    with EmulatorProcess() as emu:
        raw = settings_mapping(work, emu.base_url, watch={"settle_s": 0.1})
        inbox = work / "inbox"
        inbox.mkdir(parents=True)
        with in_process_logging(work / "service.log") as rec:
            service, task = await start_service(raw)
            sampling = asyncio.create_task(sampler())
            try:
                await asyncio.sleep(1.0)
                idle = max((lag for _, lag in samples), default=0.0)
                hidden = [place(data / "big.csv", inbox, "lag.train.csv"),
                          place(data / "eval_src" / "pair.eval.csv", inbox, "lag.eval.csv")]
                t0 = time.monotonic()
                for h in hidden:
                    os.rename(h, inbox / h.name[1:].removesuffix(".incoming"))
                t_end = await rec.wait_count("job.closed", 1, timeout=900)
            finally:
                stop.set()
                await sampling
                await stop_service(service, task)
        check_ledger(raw, 1)
    t_packaged = rec.events["job.packaged"][0][0]
    t_up0 = rec.events["upload.started"][0][0]
    t_up1 = rec.events["upload.finished"][0][0]
    packaged = rec.events["job.packaged"][0][1]

    def worst(a: float, b: float) -> float:
        return max((lag for t, lag in samples if a <= t <= b), default=0.0)

    t_win = t_end + 0.05  # the sampler runs again only after the worker that logged job.closed yields
    during = sorted(lag for t, lag in samples if t0 <= t <= t_win)
    return {"train_mib": (data / "big.csv").stat().st_size / MiB, "zip_mib": packaged["size_bytes"] / MiB,
            "job_s": t_end - t0, "package_s": packaged["duration_s"], "upload_s": t_end - t_up0,
            "max_lag_ms": 1000 * during[-1], "p99_lag_ms": 1000 * during[int(0.99 * (len(during) - 1))],
            "over_50ms": sum(lag > 0.05 for lag in during), "samples": len(during),
            "max_lag_packaging_ms": 1000 * worst(t0, t_packaged), "max_lag_put_ms": 1000 * worst(t_up0, t_up1),
            "max_lag_closing_ms": 1000 * worst(t_up1, t_win),
            "idle_max_lag_ms": 1000 * idle}


# -- section 5: drop to first request -------------------------------------------------------------------------------
class TimedRequests(list):  # type: ignore[type-arg]
    """Stands in for Emulator.requests: the emulator's middleware appends each request as it arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.monotonic())
        super().append(item)


async def section_first_request(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from retrain_uploader.emulator import Emulator

    shutil.rmtree(work, ignore_errors=True)
    settle = 1.0
    latencies = []
    async with Emulator(keys={KEY: 1}, retrain_s=3600) as emu:
        timed = TimedRequests()
        emu.requests = timed
        raw = settings_mapping(work, emu.base_url, watch={"settle_s": settle})
        inbox = work / "inbox"
        inbox.mkdir(parents=True)
        with in_process_logging(work / "service.log") as rec:
            service, task = await start_service(raw)
            try:
                for i in range(args.repeats):
                    hidden = inbox / f".first{i}.csv.incoming"
                    hidden.write_bytes(_data.small_csv(900_000 + i))
                    seen = len(timed)
                    t0 = time.monotonic()
                    os.rename(hidden, inbox / f"first{i}.csv")
                    deadline = time.monotonic() + 30
                    while not any(r.endpoint == "upload_url" for r in timed[seen:]):
                        if time.monotonic() > deadline:
                            raise TimeoutError("no upload_url request within 30 s")
                        await asyncio.sleep(0.001)
                    k = next(j for j in range(seen, len(timed)) if timed[j].endpoint == "upload_url")
                    latencies.append(timed.times[k] - t0)
                    await rec.wait_count("job.closed", i + 1, timeout=30)
            finally:
                await stop_service(service, task)
        check_ledger(raw, args.repeats)
    return {"settle_s": settle, "median_s": median(latencies), "max_s": max(latencies), "runs_s": latencies,
            "target_s": settle + 0.5}


# -- section 7: check speed -----------------------------------------------------------------------------------------
def write_numeric(path: Path, size_bytes: int) -> None:
    """A typical numeric export: ten unquoted columns of integers and decimals, a 0/1 label."""
    if path.exists() and path.stat().st_size >= size_bytes:
        return
    rng = random.Random(7)
    block = b"".join(b"%d,%d,%.4f,%d,%.2f,%d,%d,%.3f,%d,%d\n" % (
        i, rng.randint(0, 10**6), rng.random(), rng.randint(18, 90), rng.uniform(1e3, 1e6), rng.randint(0, 5),
        rng.randint(0, 9999), rng.random() * 100, rng.randint(0, 1 << 20), rng.random() < 0.2) for i in range(100_000))
    with open(path, "wb") as f:
        f.write(b"id,a,b,age,income,c,d,score,e,label\n")
        while f.tell() < size_bytes:
            f.write(block)


def section_check_speed(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """checks.check_csv (the whole check plus the sha256) on a numeric export and on the bench's quoted Japanese
    rows, from a warm page cache, in this process."""
    from retrain_uploader.checks import check_csv

    out: dict[str, Any] = {}
    for key, name, what in (("numeric", "check.numeric.csv", "numeric export, no quotes"),
                            ("quoted_japanese", "check.mixed.csv", "quoted Japanese text (the bench rows)")):
        path = data / name
        path.read_bytes()  # warm the page cache
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            check_csv(path)
            times.append(time.perf_counter() - t0)
        size = path.stat().st_size
        out[key] = {"what": what, "mib": size / MiB, "time_s": median(times), "mib_s": size / MiB / median(times)}
    return out


# -- section 8: a slow link ------------------------------------------------------------------------------------------
def section_slow_link(args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    """Drop→done/ (less settle) through a link of ``--slow-mb`` MB/s against curl through the same: the daemon's
    ``[upload] max_bytes_per_s`` and ``curl --limit-rate`` (both pace the sender; the emulator has no throttle)."""
    src = data / "throttled.csv"
    size = src.stat().st_size
    rate = int(args.slow_mb * 1e6)
    runs: dict[str, list[dict[str, Any]]] = {"daemon": [], "curl": []}
    with EmulatorProcess() as emu:
        for i in range(args.repeats):
            runs["daemon"].append(daemon_once(work, emu, src, settle_s=0.1, upload={"max_bytes_per_s": rate}))
            if shutil.which("curl"):
                runs["curl"].append(curl_once(emu, src, limit_b_s=rate))
            print(f"  [8] repeat {i + 1}/{args.repeats} done", flush=True)
    out: dict[str, Any] = {"file_mb": size / 1e6, "rate_mb_s": args.slow_mb,
                           "daemon_net_s": median([r["net_s"] for r in runs["daemon"]]), "runs": runs}
    if runs["curl"]:
        out["curl_s"] = median([r["time_s"] for r in runs["curl"]])
        out["ratio"] = median([d["net_s"] / c["time_s"] for d, c in zip(runs["daemon"], runs["curl"], strict=True)])
    return out


# -- section 6: the bandwidth cap's accuracy --------------------------------------------------------------------------
def cap_files(args: argparse.Namespace, data: Path) -> tuple[int, list[Path], list[Path]]:
    """The bytes of one cap_seconds upload at the cap; one file of that size, and four of a quarter each."""
    size = int(args.cap_mb * 1e6 * args.cap_seconds)
    return size, [data / "cap_one.csv"], [data / f"cap_four_{i}.csv" for i in range(4)]


def spawn_daemon(cfg: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen([*daemon_command(), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=log, stdin=subprocess.DEVNULL)


async def cap_run(work: Path, files: list[Path], cap: int) -> dict[str, Any]:
    """The daemon (a subprocess, 4 workers, `max_bytes_per_s = cap`) uploads ``files`` dropped at once; each PUT's
    arrival and last byte are timed by the emulator, which runs in this process with a core of its own."""
    from retrain_uploader.emulator import Emulator

    shutil.rmtree(work, ignore_errors=True)
    async with Emulator(keys={KEY: 1}, retrain_s=3600) as emu:
        timed = TimedRequests()
        emu.requests = timed
        raw = settings_mapping(work, emu.base_url, watch={"settle_s": 0.1}, pool={"workers": 4},
                               upload={"max_bytes_per_s": cap})
        cfg = work / "config.toml"
        cfg.write_text(to_toml(raw))
        inbox = work / "inbox"
        inbox.mkdir(parents=True)
        log_path = work / "daemon.log"
        proc = spawn_daemon(cfg, log_path)
        try:
            deadline = time.monotonic() + 60
            while "service.started" not in log_path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start: {log_path.read_text()[-2000:]}")
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # the inbox watch exists a moment after service.started (see section 1)
            hidden = [place(f, inbox, f.name) for f in files]
            for h in hidden:
                os.rename(h, inbox / h.name[1:].removesuffix(".incoming"))
            deadline = time.monotonic() + 600
            while len(emu.uploads) < len(files):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{len(emu.uploads)}/{len(files)} uploads: {log_path.read_text()[-2000:]}")
                await asyncio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        arrivals = {r.job_id: timed.times[i] for i, r in enumerate(timed) if r.endpoint == "put"}
        puts = [(arrivals[u.job_id], u.at, u.size) for u in emu.uploads]
    first, last = min(p[0] for p in puts), max(p[1] for p in puts)
    total = sum(p[2] for p in puts)
    rate = total / (last - first)
    return {"files": len(files), "bytes": total, "seconds": last - first, "rate_b_s": rate,
            "rate_vs_cap": rate / cap, "each_b_s": [n / (e - s) for s, e, n in puts],
            "overlap": max(p[0] for p in puts) < min(p[1] for p in puts)}


async def section_cap(args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    cap = int(args.cap_mb * 1e6)
    _, one_file, four_files = cap_files(args, data)
    import structlog  # the in-process emulator logs every request at info: keep the bench's output readable

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    try:
        one = await cap_run(work / "one", one_file, cap)
        four = await cap_run(work / "four", four_files, cap)
    finally:
        structlog.reset_defaults()
    return {"cap_b_s": cap, "target_s": args.cap_seconds, "one": one, "four": four}


# -- driver ---------------------------------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace, data: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    size, only = args.size_mb * MiB, args.only
    (data / "train_src").mkdir(exist_ok=True)
    (data / "eval_src").mkdir(exist_ok=True)
    if ("1" in only and args.large == "mixed") or "4" in only:
        _data.write_csv(data / "big.csv", size, seed=1)
    if "1" in only and args.large == "numeric":
        write_numeric(data / "big.numeric.csv", size)
    if "8" in only:
        _data.write_csv(data / "throttled.csv", int(args.slow_mb * 1e6 * args.slow_seconds), seed=9)
    if "2" in only:
        _data.write_csv(data / "train_src" / "pair.train.csv", size // 2, seed=2)
    if "2" in only or "4" in only:
        _data.write_csv(data / "eval_src" / "pair.eval.csv", size // 16, seed=3)
    if "7" in only:
        _data.write_csv(data / "check.mixed.csv", min(size, 256 * MiB), seed=8)
        write_numeric(data / "check.numeric.csv", min(size, 256 * MiB))
    if "6" in only:
        cap_size, one_file, four_files = cap_files(args, data)
        _data.write_csv(one_file[0], cap_size, seed=4)
        for i, path in enumerate(four_files):
            _data.write_csv(path, cap_size // 4, seed=5 + i)
    return {"generate_s": time.perf_counter() - t0}


def fmt(v: Any, unit: str = "", digits: int = 2) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def print_table(res: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str]] = []
    s1 = res.get("large_csv", {})
    if "daemon" in s1:
        d = s1["daemon"]
        rows.append(("1 large CSV", f"daemon drop→done/ ({s1['file_mib']:.0f} MiB {s1.get('kind', 'mixed')}, "
                     f"settle {s1['settle_s']} s)",
                     fmt(d["drop_to_done_s"], " s"), fmt(d["peak_rss_mib"], " MiB", 1)))
        phase = "hash phase (one pass: checked during the PUT)" if d.get("one_pass") else "check+hash phase"
        rows.append(("", f"  {phase}", f"{d['check_hash_s']:.2f} s = {d['check_hash_mib_s']:.0f} MiB/s", ""))
        lo, hi = d["upload_mib_s_range"]
        rows.append(("", "  upload phase (PUT)",
                     f"{d['upload_s']:.2f} s = {d['upload_mib_s']:.0f} MiB/s ({lo:.0f}-{hi:.0f})", ""))
        if "cpu_s" in d:  # robust to load elsewhere, unlike the times: the cost per byte
            rows.append(("", "  daemon CPU, drop→done/ (all threads)",
                         f"{d['cpu_s']:.2f} s = {d['cpu_s'] * 1000 / s1['file_mib']:.2f} ms/MiB", ""))
        if "time_s" in s1.get("curl", {}):
            c = s1["curl"]
            lo, hi = c["mib_s_range"]
            rows.append(("", "curl -T", f"{c['time_s']:.2f} s = {c['mib_s']:.0f} MiB/s ({lo:.0f}-{hi:.0f})",
                         fmt(c["peak_rss_mib"], " MiB", 1)))
            if "cpu_s" in c:
                rows.append(("", "  curl CPU", f"{c['cpu_s']:.2f} s = {c['cpu_s'] * 1000 / s1['file_mib']:.2f} ms/MiB",
                             ""))
            pairs = ", ".join(f"{x:.2f}" for x in s1["upload_vs_curl_pairs"])
            rows.append(("", "  daemon PUT / curl (median of paired runs)", f"{s1['upload_vs_curl']:.2f}x ({pairs})",
                         ""))
            pairs = ", ".join(f"{x:.2f}" for x in s1["done_vs_curl_pairs"])
            rows.append(("", "  drop→done/ less settle / curl (paired)", f"{s1['done_vs_curl']:.2f}x ({pairs})", ""))
        if "time_s" in s1.get("reference", {}):
            r = s1["reference"]
            rows.append(("", "requests get+read()+put", f"{r['time_s']:.2f} s (PUT {r['put_mib_s']:.0f} MiB/s)",
                         fmt(r["peak_rss_mib"], " MiB", 1)))
    s2 = res.get("packaging", {})
    if "daemon_level1" in s2:
        rows.append(("2 pair zip", f"{s2['train_mib']:.0f} + {s2['eval_mib']:.0f} MiB; time, MiB/s, zip size",
                     "saved @10 / @100 Mbit/s", ""))
        labels = (("daemon_level0", "package_pair level 0 (stored)"), ("daemon_level1", "package_pair level 1"),
                  ("zip_1", "zip -1"), ("daemon_level6", "package_pair level 6"), ("zip_6", "zip -6"))
        for name, label in labels:
            if name in s2:
                p = s2[name]
                rows.append(("", f"{label}: {p['time_s']:.2f} s, {p['mib_s']:.0f} MiB/s, {p['zip_mib']:.0f} MiB "
                             f"({100 * p['ratio']:.0f}%)",
                             f"{p['saved_10mbit_s']:.0f} s / {p['saved_100mbit_s']:.1f} s", ""))
    s3 = res.get("small_files", {})
    if "drain_s" in s3:
        rows.append(("3 small files", f"{s3['files']} files, {s3['workers']} workers, 50 ms/API answer",
                     f"{s3['drain_s']:.2f} s vs ideal {s3['ideal_s']:.2f} s = {s3['ratio']:.2f}x", ""))
        rows.append(("", "daemon CPU per file / ledger commits per job",
                     f"{s3['cpu_ms_per_file']:.2f} ms (user {s3['cpu_user_ms_per_file']:.2f}, system "
                     f"{s3['cpu_system_ms_per_file']:.2f}) / {s3['commits_per_job']:.1f}", ""))
        rows.append(("", "requests/file (worker path / all)",
                     f"{s3['requests_per_file_worker_path']:.2f} / {s3['requests_per_file_total']:.2f}", ""))
        st = s3["step_median_ms"]
        rows.append(("", "per job, median: upload_url / status / PUT",
                     f"{st['upload_url call']} / {st['status baseline call']} / {st['PUT']} ms", ""))
        rows.append(("", "first upload_url after the drop", f"{s3['first_request_after_s']:.2f} s", ""))
    s4 = res.get("loop_lag", {})
    if "max_lag_ms" in s4:
        rows.append(("4 loop lag", f"pair {s4['train_mib']:.0f} MiB train: check+zip+upload {s4['job_s']:.1f} s",
                     f"max {s4['max_lag_ms']:.1f} ms, p99 {s4['p99_lag_ms']:.1f} ms", ""))
        phases = [s4[k] for k in ("max_lag_packaging_ms", "max_lag_put_ms", "max_lag_closing_ms")]
        rows.append(("", "  max while packaging / PUT / closing (move, staging zip removed)",
                     " / ".join(f"{x:.1f}" for x in phases) + " ms", ""))
    s5 = res.get("first_request", {})
    if "median_s" in s5:
        rows.append(("5 first request", "rename into inbox → first upload_url (settle_s 1)",
                     f"median {s5['median_s']:.3f} s, max {s5['max_s']:.3f} s", ""))
    s7 = res.get("check_speed", {})
    for key in ("numeric", "quoted_japanese"):
        if key in s7:
            r = s7[key]
            rows.append(("7 check speed" if key == "numeric" else "", f"check_csv (check+hash), {r['what']}",
                         f"{r['time_s']:.2f} s = {r['mib_s']:.0f} MiB/s", ""))
    s6 = res.get("cap", {})
    if "one" in s6:
        cap = s6["cap_b_s"] / 1e6
        for key, label in (("one", "one upload"), ("four", "four in parallel, together")):
            r = s6[key]
            rows.append(("6 bandwidth cap" if key == "one" else "",
                         f"max_bytes_per_s = {cap:g} MB/s, {label}: {r['bytes'] / 1e6:.0f} MB",
                         f"{r['seconds']:.2f} s = {r['rate_b_s'] / 1e6:.3f} MB/s = {r['rate_vs_cap']:.4f}x cap", ""))
    s8 = res.get("slow_link", {})
    if "daemon_net_s" in s8:
        what = f"{s8['file_mb']:.0f} MB at {s8['rate_mb_s']:g} MB/s: daemon drop→done/ less settle"
        rows.append(("8 slow link", what, f"{s8['daemon_net_s']:.2f} s", ""))
        if "curl_s" in s8:
            rows.append(("", f"curl --limit-rate {s8['rate_mb_s']:g}M; daemon / curl (paired)",
                         f"{s8['curl_s']:.2f} s; {s8['ratio']:.3f}x", ""))
    w = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    head = ("section", "what", "result", "peak RSS")
    w = [max(w[i], len(head[i])) for i in range(4)]
    print()
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
    print("  ".join("-" * w[i] for i in range(4)))
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: Any, target: str, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "goal": target, "pass": ok})

    s1 = res.get("large_csv", {})
    d = s1.get("daemon", {})
    add("daemon peak RSS", d.get("peak_rss_mib"), "<= 100 MiB", d.get("peak_rss_mib", 1e9) <= 100 if d else None)
    ratio = s1.get("upload_vs_curl")
    add("daemon upload vs curl", ratio, ">= 0.8x curl", None if ratio is None else ratio >= 0.8)
    done = s1.get("done_vs_curl")
    add("drop→done/ less settle vs curl", done, "<= 1.5x curl", None if done is None else done <= 1.5)
    s7 = res.get("check_speed", {})
    for key, goal in (("numeric", 300), ("quoted_japanese", 100)):
        r = s7.get(key)
        add(f"check+hash throughput, {key.replace('_', ' ')}", None if r is None else r["mib_s"], f">= {goal} MiB/s",
            None if r is None else r["mib_s"] >= goal)
    s8 = res.get("slow_link", {})
    add("slow link: drop→done/ less settle vs curl", s8.get("ratio"), "<= 1.05x curl",
        s8["ratio"] <= 1.05 if "ratio" in s8 else None)
    s3 = res.get("small_files", {})
    add("small-file drain vs ideal", s3.get("ratio"), "<= 1.3x", s3["ratio"] <= 1.3 if "ratio" in s3 else None)
    add("daemon CPU per small file", s3.get("cpu_ms_per_file"), "<= 5 ms",
        s3["cpu_ms_per_file"] <= 5 if "cpu_ms_per_file" in s3 else None)
    s4 = res.get("loop_lag", {})
    add("event-loop lag (max)", s4.get("max_lag_ms"), "< 50 ms", s4["max_lag_ms"] < 50 if "max_lag_ms" in s4 else None)
    s5 = res.get("first_request", {})
    add("drop to first request (max)", s5.get("max_s"), "<= settle_s + 0.5 s = 1.5 s",
        s5["max_s"] <= s5["target_s"] if "max_s" in s5 else None)
    s6 = res.get("cap", {})
    for key, label in (("one", "one upload"), ("four", "four in parallel")):
        r = s6.get(key)
        add(f"cap accuracy, {label}", None if r is None else r["rate_vs_cap"], "within 1 ± 0.05 of the cap",
            None if r is None else abs(r["rate_vs_cap"] - 1) <= 0.05)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=None, help="large CSV size in MiB (default 1024; quick 200)")
    parser.add_argument("--small-files", type=int, default=None, help="section 3 file count (default 1000; quick 200)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="section 3: cProfile the drain into this file and print its top entries")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a run under ~2 minutes")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement (medians are reported)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the generated CSVs here and reuse them next time (default: a temporary folder)")
    parser.add_argument("--only", default="12345678", help="sections to run, e.g. --only 13")
    parser.add_argument("--cap-mb", type=float, default=4.0, help="section 6: the cap in MB/s (default 4)")
    parser.add_argument("--cap-seconds", type=float, default=30.0, help="section 6: seconds per upload (default 30)")
    parser.add_argument("--large", choices=("mixed", "numeric"), default="mixed",
                        help="section 1's file: the bench rows (quoted Japanese text) or a numeric export")
    parser.add_argument("--two-pass", action="store_true",
                        help="section 1: check the whole file before the PUT, as before one pass (for comparison)")
    parser.add_argument("--slow-mb", type=float, default=26.0, help="section 8: the link's rate in MB/s (default 26)")
    parser.add_argument("--slow-seconds", type=float, default=8.0, help="section 8: seconds per upload (default 8)")
    args = parser.parse_args()
    args.size_mb = args.size_mb or (200 if args.quick else 1024)
    args.small_files = args.small_files or (200 if args.quick else 1000)

    own_data = args.data_dir is None
    data = Path(tempfile.mkdtemp(prefix="retrain-bench-data-")) if own_data else args.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    work = data / f"work-{os.getpid()}"  # on the same filesystem as the data: inputs are hard-linked, not copied
    work.mkdir()
    res: dict[str, Any] = {"machine": machine(), "load_avg_start": load_avg(),
                           "command": " ".join([Path(sys.executable).name, *sys.argv]),
                           "params": {"size_mb": args.size_mb, "small_files": args.small_files,
                                      "repeats": args.repeats, "quick": args.quick}}
    crashed = False
    started = time.monotonic()
    print(f"machine: {res['machine']}; load average {res['load_avg_start']}", flush=True)
    try:
        res["data"] = prepare_data(args, data)
        sections: list[tuple[str, str, Callable[[], Any]]] = [
            ("1", "large_csv", lambda: section_large(args, data, work / "large")),
            ("2", "packaging", lambda: section_packaging(args, data, work / "packaging")),
            ("3", "small_files", lambda: asyncio.run(section_small_files(args, work / "small"))),
            ("4", "loop_lag", lambda: asyncio.run(section_lag(args, data, work / "lag"))),
            ("5", "first_request", lambda: asyncio.run(section_first_request(args, work / "first"))),
            ("6", "cap", lambda: asyncio.run(section_cap(args, data, work / "cap"))),
            ("7", "check_speed", lambda: section_check_speed(args, data)),
            ("8", "slow_link", lambda: section_slow_link(args, data, work / "slow")),
        ]
        for key, name, fn in sections:
            if key not in args.only:
                continue
            print(f"[{key}] {name} ...", flush=True)
            t0 = time.monotonic()
            try:
                res[name] = fn()
            except Exception as e:
                traceback.print_exc()
                res[name] = {"error": f"{type(e).__name__}: {e}"}
                crashed = True
            print(f"[{key}] {name}: {time.monotonic() - t0:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if own_data:
            shutil.rmtree(data, ignore_errors=True)
    res["load_avg_end"] = load_avg()
    res["elapsed_s"] = time.monotonic() - started
    print_table(res)
    res["targets"] = targets(res)
    print()
    for t in res["targets"]:
        verdict = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        value = fmt(t["value"]) if t["value"] is not None else "-"
        print(f"{verdict}  {t['target']}: {value} (goal {t['goal']})")
    print(f"\nload average start {res['load_avg_start']} end {res['load_avg_end']}; elapsed {res['elapsed_s']:.0f} s")
    print(json.dumps(res, default=str))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
