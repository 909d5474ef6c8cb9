"""The emulator in its own process (so its sha256 of every PUT body and its HTTP parsing get their own core).

    python bench/_emu.py --key KEY=1 [--latency-s 0.05] [--retrain-s 3600] [--running N]

Prints ``READY <base_url>`` on stdout once listening, serves until SIGTERM/SIGINT. The request log is read
through the emulator's own admin route ``GET /_emulator/requests``. ``--running N`` starts with N jobs of the first
key already uploaded and retraining for good (their ids: ``GET /_emulator/jobs``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import structlog

from retrain_uploader.emulator import Emulator


async def _main(args: argparse.Namespace) -> None:
    keys = {}
    for item in args.key:
        key, _, model_id = item.partition("=")
        keys[key] = int(model_id or 1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Emulator(keys=keys, latency_s=args.latency_s, retrain_s=args.retrain_s) as emu:
        for n in range(args.running):
            emu.add_running_job(args.key[0].partition("=")[0], f"running-{n}.csv")
        print(f"READY {emu.base_url}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", action="append", default=[])
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--retrain-s", type=float, default=3600.0)
    parser.add_argument("--running", type=int, default=0)
    args = parser.parse_args()
    # The emulator logs every request at info; printing them would cost the emulator CPU and clutter stdout.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
