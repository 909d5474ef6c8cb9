"""Many models on one daemon process (issue 13: 300): inotify instances, fds and threads from /proc, and each file's
drop -> queued latency (the job's created_at against the time its file was renamed into its inbox).

Run: .venv/bin/python -m bench.many_models [--models 300]   (from the repository root; about 30 s)
Targets: every inbox event-watched (drop -> queued <= settle_s + 0.5 s in all of them), fds < 100, threads < 60.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from retrain_uploader.emulator import Emulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests._proc import DaemonProcess, LedgerView, write_config

SETTLE_S = 1.0


def proc_counts(pid: int) -> dict[str, int]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return {
        "fds": len(links),
        "inotify_instances": links.count("anon_inode:inotify"),
        "threads": int(status["Threads"]),
        "rss_kb": int(status["VmRSS"].split()[0]),
    }


def _posix(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def main(models: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with Emulator(keys={f"key-{i}": i + 1 for i in range(models)}) as emu:
            keys = {f"m{i:03d}": f"key-{i}" for i in range(models)}
            config = write_config(root, emu.base_url, keys=keys, watch={"settle_s": SETTLE_S, "rescan_s": 60},
                                  pool={"workers": 8})
            daemon = DaemonProcess(config, root)
            await daemon.start(timeout=60)
            try:
                idle = proc_counts(daemon.pid)
                dropped = time.monotonic()
                dropped_at: dict[str, float] = {}
                for i, model in enumerate(keys):
                    part = root / "inbox" / model / f".f{i}.csv.part"
                    part.write_text(f"a,b\n{i},{i}\n")
                    part.rename(part.with_name(f"f{i}.csv"))  # whole at once: its settle starts now
                    dropped_at[f"f{i}.csv"] = time.time()
                view = LedgerView(root / "state" / "ledger.sqlite3")
                first_all = None
                while time.monotonic() - dropped < 60:
                    if len(view.jobs()) >= models and first_all is None:
                        first_all = time.monotonic() - dropped
                        break
                    await asyncio.sleep(0.05)
                busy = proc_counts(daemon.pid)
                latency = sorted(
                    _posix(job["created_at"]) - dropped_at[job["upload_filename"]] for job in view.jobs()
                )
            finally:
                await daemon.close()
    print(f"models={models} settle_s={SETTLE_S} rescan_s=60")
    print(f"idle: {idle}")
    print(f"after drops: {busy}")
    print(f"all {models} files queued {first_all:.2f} s after the drops (settle {SETTLE_S} s)")
    print(f"drop -> queued per file: median {latency[len(latency) // 2]:.2f} s, max {latency[-1]:.2f} s")
    verdicts = [
        ("every inbox event-watched: max drop -> queued", latency[-1], SETTLE_S + 0.5, "s"),
        ("fds after the drops", busy["fds"], 99, ""),
        ("threads after the drops", busy["threads"], 59, ""),
        ("RSS after the drops", busy["rss_kb"] / 1024, 100, "MiB"),
    ]
    for what, value, limit, unit in verdicts:
        print(f"{'PASS' if value <= limit else 'FAIL'}  {what}: {value:.2f} {unit} (goal <= {limit} {unit})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=300)
    logging.disable(logging.INFO)  # the in-process emulator's lines
    asyncio.run(main(parser.parse_args().models))
