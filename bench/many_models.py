"""200 models on one daemon process: inotify instances, fds and threads from /proc, and drop -> queued latency.

Run: .venv/bin/python -m bench.many_models   (from the repository root; about 20 s)
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from retrain_uploader.emulator import Emulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests._proc import DaemonProcess, LedgerView, write_config

MODELS = 200
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


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with Emulator(keys={f"key-{i}": i + 1 for i in range(MODELS)}) as emu:
            keys = {f"m{i:03d}": f"key-{i}" for i in range(MODELS)}
            config = write_config(root, emu.base_url, keys=keys, watch={"settle_s": SETTLE_S, "rescan_s": 60},
                                  pool={"workers": 8})
            daemon = DaemonProcess(config, root)
            await daemon.start(timeout=60)
            try:
                idle = proc_counts(daemon.pid)
                dropped = time.monotonic()
                for i, model in enumerate(keys):
                    (root / "inbox" / model / f"f{i}.csv").write_text(f"a,b\n{i},{i}\n")
                view = LedgerView(root / "state" / "ledger.sqlite3")
                first_all = None
                while time.monotonic() - dropped < 60:
                    if len(view.jobs()) >= MODELS and first_all is None:
                        first_all = time.monotonic() - dropped
                        break
                    await asyncio.sleep(0.05)
                busy = proc_counts(daemon.pid)
            finally:
                await daemon.close()
    print(f"models={MODELS} settle_s={SETTLE_S} rescan_s=60")
    print(f"idle: {idle}")
    print(f"after drops: {busy}")
    print(f"all {MODELS} files queued {first_all:.2f} s after the drops (settle {SETTLE_S} s)")


if __name__ == "__main__":
    asyncio.run(main())
