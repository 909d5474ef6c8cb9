"""`run --dry-run`: the daemon's watch and checks, `dryrun.would_upload` or the refusal once per file, no API call,
nothing moved or created, the ledger's bytes unchanged."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from retrain_uploader.config import Settings
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import Ledger
from retrain_uploader.preflight import dry_run

from ._proc import DaemonProcess, write_config
from .conftest import drop, wait_for

GOOD = "x,y,label\n1,2,yes\n3,4,no\n"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


async def test_dry_run_logs_each_verdict_once_and_changes_nothing(
    tmp_path: Path, emulator: Emulator, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    inbox = settings.model("alpha").inbox
    inbox.mkdir(parents=True)
    settings.model("beta").inbox.mkdir(parents=True)
    with Ledger(settings.ledger.path) as ledger:
        ledger.create_job(model="alpha", kind="csv", name="old", sources=["old.csv"], upload_filename="old.csv")
    state_before = snapshot(settings.ledger.path.parent)
    drop(inbox, "good.csv", GOOD)
    drop(inbox, "ragged.csv", "a,b\n1\n")
    drop(inbox, "notes.txt", "hello")
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(dry_run(settings, stop=stop, handle_signals=False))

        def verdicts() -> list[dict[str, Any]]:
            return [e for e in logs if e["event"] in ("dryrun.would_upload", "dryrun.refused")]

        await wait_for(lambda: len(verdicts()) >= 3, what="three verdicts")
        deadline = asyncio.get_running_loop().time() + 1.2  # more than two rescans: no second verdict appears
        await wait_for(lambda: asyncio.get_running_loop().time() > deadline, what="two rescans")
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0
    would = [e for e in verdicts() if e["event"] == "dryrun.would_upload"]
    refused = {e["file"]: e["error"] for e in verdicts() if e["event"] == "dryrun.refused"}
    assert len(verdicts()) == 3
    assert would == [{"event": "dryrun.would_upload", "log_level": "info", "model": "alpha", "file": "good.csv",
                      "kind": "csv", "sources": ["good.csv"], "size_bytes": len(GOOD),
                      "sha256": hashlib.sha256(GOOD.encode()).hexdigest(), "warnings": [],
                      "already_sent_as_job": None}]
    assert "row 2 has 1 column" in refused["ragged.csv"]
    assert "not a supported file" in refused["notes.txt"]
    assert emulator.requests == []
    assert sorted(p.name for p in inbox.iterdir()) == ["good.csv", "notes.txt", "ragged.csv"]  # no done/, failed/
    assert snapshot(settings.ledger.path.parent) == state_before


async def test_run_dry_run_as_a_real_process_calls_no_api_moves_nothing_and_leaves_the_ledger(
    tmp_path: Path, emulator: Emulator
) -> None:
    config = write_config(tmp_path, emulator.base_url)
    with config.open("a", encoding="utf-8") as f:  # the last [[models]] table is alpha's
        f.write('target = "label"\ntask = "binary"\n')
    settings = Settings.from_toml(config)
    inbox = settings.model("alpha").inbox
    inbox.mkdir(parents=True)
    with Ledger(settings.ledger.path) as ledger:  # a deployment's existing ledger
        ledger.create_job(model="alpha", kind="csv", name="old", sources=["old.csv"], upload_filename="old.csv")
    state_before = snapshot(settings.ledger.path.parent)
    drop(inbox, "good.csv", GOOD)
    drop(inbox, "three.csv", "x,y,label\n1,2,a\n3,4,b\n5,6,c\n")
    drop(inbox, "ragged.csv", "x,y,label\n1,2\n")
    inbox_before = snapshot(inbox)
    daemon = DaemonProcess(config, tmp_path)
    try:
        await daemon.start(args=["--dry-run"], ready_event="dryrun.started")

        def verdicts() -> list[dict[str, Any]]:
            return [r for r in daemon.records() if r.get("event") in ("dryrun.would_upload", "dryrun.refused")]

        await wait_for(lambda: len(verdicts()) >= 3, what="three verdicts")
        deadline = asyncio.get_running_loop().time() + 1.2  # more than two rescans (rescan_s 0.5)
        await wait_for(lambda: asyncio.get_running_loop().time() > deadline, what="two rescans")
        code, _ = await daemon.terminate()
    finally:
        await daemon.close()
    assert code == 0, daemon.tail()
    by_file = {r["file"]: r for r in verdicts()}
    assert len(verdicts()) == 3  # once per file, not once per rescan
    would = by_file["good.csv"]
    assert (would["event"], would["model"], would["kind"], would["size_bytes"], would["sha256"]) == (
        "dryrun.would_upload", "alpha", "csv", len(GOOD), hashlib.sha256(GOOD.encode()).hexdigest())
    assert by_file["three.csv"]["event"] == "dryrun.refused"
    assert "task is binary but target 'label' has 3 distinct value(s)" in by_file["three.csv"]["error"]
    assert "row 2 has 2 columns, the header has 3" in by_file["ragged.csv"]["error"]
    assert daemon.logged("dryrun.stopped")
    assert emulator.requests == []
    assert snapshot(inbox) == inbox_before  # no done/, no failed/, no error file, nothing touched
    assert snapshot(settings.ledger.path.parent) == state_before  # the ledger's bytes and mtime, no -wal or -shm
    assert "key-alpha-0001" not in daemon.text()
