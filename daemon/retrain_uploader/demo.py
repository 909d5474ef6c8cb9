"""``retrain-uploader demo``: the real daemon against the built-in emulator, with bundled sample data."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

from .config import Settings
from .emulator import Emulator
from .history import display_width
from .ledger import AFTER_UPLOAD, Ledger
from .service import Service

__all__ = ["run_demo"]

DEMO_KEY = "demo-key-churn-0001"
_TIMEOUT_S = 60.0


def _samples() -> list[Path]:
    folder = resources.files("retrain_uploader") / "samples"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".csv"))


async def run_demo(*, once: bool, workdir: Path | None = None) -> int:
    """Start the emulator, a daemon on a temporary inbox, drop the samples, and show them uploaded."""
    own_dir = workdir is None
    if workdir is None:
        root = Path(tempfile.mkdtemp(prefix="retrain-uploader-demo-"))
    else:
        # Each run gets a fresh subfolder: an earlier run's ledger would otherwise report its jobs as this run's
        # (and its emulator is gone), while this run's samples sat untaken as duplicates.
        os.makedirs(workdir, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=workdir))
    inbox = root / "inbox" / "demo"
    key_file = root / "keys" / "demo"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(DEMO_KEY + "\n", encoding="utf-8")
    key_file.chmod(0o600)
    samples = _samples()
    try:
        async with Emulator(keys={DEMO_KEY: 101}, retrain_s=2.0) as emulator:
            settings = Settings.from_mapping(
                {
                    "api": {"base_url": emulator.base_url},
                    "ledger": {"path": str(root / "state" / "ledger.sqlite3")},
                    "watch": {"settle_s": 0.5, "rescan_s": 5},
                    "retry": {"base_delay_s": 0.2, "max_delay_s": 2},
                    "pool": {"workers": 2, "shutdown_grace_s": 5},
                    "status": {"poll_s": 0.5},
                    "models": [{"name": "demo", "inbox": str(inbox), "api_key_file": str(key_file)}],
                }
            )
            service = Service(settings, handle_signals=not once)
            task = asyncio.create_task(service.run())
            await asyncio.wait_for(service.ready.wait(), timeout=_TIMEOUT_S)
            print(f"emulator at {emulator.base_url}; daemon watching {inbox}")
            for sample in samples:
                shutil.copyfile(sample, inbox / sample.name)
                print(f"dropped {sample.name}")
            expected = len([s for s in samples if not s.name.endswith(".eval.csv")])
            ok = await _wait_closed(settings, expected)
            if ok:
                print("uploaded; waiting for the emulator's retraining to finish and the results to download…")
                await _wait_results(settings)
            _show(settings, emulator)
            if not once:
                print(f"\nThe daemon keeps running: drop more CSVs into {inbox} (Ctrl-C to stop).")
            else:
                service.request_stop()
            await task
            return 0 if ok else 1
    finally:
        if own_dir and once:
            shutil.rmtree(root, ignore_errors=True)


async def _wait_closed(settings: Settings, expected: int) -> bool:
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        with Ledger(settings.ledger.path) as ledger:
            jobs = ledger.jobs()
        if len(jobs) >= expected and all(job.closed for job in jobs):
            return all(job.state in AFTER_UPLOAD for job in jobs)
        await asyncio.sleep(0.1)  # polling a condition, with a deadline
    return False


async def _wait_results(settings: Settings) -> None:
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        with Ledger(settings.ledger.path) as ledger:
            if all(job.result_path for job in ledger.jobs()):
                return
        await asyncio.sleep(0.1)  # polling a condition, with a deadline


def _show(settings: Settings, emulator: Emulator) -> None:
    with Ledger(settings.ledger.path) as ledger:
        jobs = ledger.jobs()
    print("\nledger:")
    print(f"  {'id':>3}  {'state':<10} {'upload_filename':<24} {'retrain_job_id':<38} {'bytes':>7}  moved to")
    for job in jobs:
        print(
            f"  {job.id:>3}  {job.state:<10} {_cells(job.upload_filename, 24)} {job.retrain_job_id or '-':<38} "
            f"{job.size_bytes or 0:>7}  {', '.join(job.moved_to)}"
        )
        if job.result_path:
            print(f"       retraining {job.retrain_status}, model_id {job.model_id}, result in {job.result_path}")
        if job.error:
            print(f"       error: {job.error}")
    print(f"\nthe emulator received {len(emulator.uploads)} upload(s):")
    for upload in emulator.uploads:
        print(f"  {_cells(upload.filename, 24)} {upload.size:>7} bytes  sha256 {upload.sha256[:16]}…")


def _cells(text: str, width: int) -> str:
    """``text`` padded to ``width`` terminal cells: a Japanese name's characters take two each."""
    return text + " " * max(0, width - display_width(text))
