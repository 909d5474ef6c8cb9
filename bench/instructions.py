"""Instructions per small file: section 3's drain, counted by callgrind instead of timed.

CPU time on a shared VM moves by ±15% between runs of the same code (session 6: 5.70 to 8.34 ms per file for one
commit within ten minutes), which hides any change smaller than that. The number of instructions the daemon's process
executes for the same work moves by ~0.2%, so two versions can be compared one run each. It counts user-space
instructions only (not the kernel's work for the daemon's syscalls, nor waiting), and a Python under valgrind uses
the system allocator (PYTHONMALLOC=malloc), so compare versions with it, not with the timed figures.

    .venv/bin/python bench/instructions.py [--files 200]                      # this tree
    PYTHONPATH=/other/tree/daemon .venv/bin/python bench/instructions.py      # another version, same bench

Needs valgrind (``apt-get install valgrind``). The emulator runs in its own process, not counted; instrumentation is
switched on after the service has started and off once the last ``job.closed`` is logged, so start-up and imports do
not count. Prints one line: millions of instructions per file. ~45 s for 200 files.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_INNER = "RETRAIN_UPLOADER_BENCH_UNDER_CALLGRIND"


def _control(switch: str) -> None:
    subprocess.run(["callgrind_control", "-i", switch, str(os.getpid())], capture_output=True, check=False)


async def _drain(files: int, work: Path) -> None:
    import _data
    import run

    with run.EmulatorProcess(latency_s=0.05) as emu:
        raw = run.settings_mapping(work, emu.base_url, watch={"settle_s": 0.05}, pool={"workers": 8})
        incoming = work / "incoming"
        incoming.mkdir(parents=True)
        names = [f"small{i:05d}.csv" for i in range(files)]
        for i, name in enumerate(names):
            (incoming / name).write_bytes(_data.small_csv(i))
        with run.in_process_logging(work / "service.log") as rec:
            service, task = await run.start_service(raw)
            try:
                _control("on")
                for name in names:
                    os.rename(incoming / name, work / "inbox" / name)
                await rec.wait_count("job.closed", files, timeout=max(600.0, files * 3.0))
                _control("off")
            finally:
                await run.stop_service(service, task)
        run.check_ledger(raw, files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args()
    if os.environ.get(_INNER):
        with tempfile.TemporaryDirectory(prefix="rb-instr-") as tmp:
            asyncio.run(_drain(args.files, Path(tmp) / "work"))
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="rb-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, _INNER: "1", "PYTHONMALLOC": "malloc"}
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, __file__, "--files", str(args.files)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        collected = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or collected is None:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
    print(f"instructions per small file: {int(collected.group(1)) / args.files / 1e6:.3f} M ({args.files} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
