"""A damaged, truncated or newer-schema ledger: `run` says so in one line and exits with a status systemd does not
restart; `jobs` and `status` say so and exit 1. Real processes, real SQLite files damaged on disk."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from retrain_uploader.cli import EXIT_LEDGER
from retrain_uploader.ledger import SCHEMA_VERSION, Ledger, LedgerDamaged

from ._proc import COMMAND, write_config

_ENV = {k: v for k, v in os.environ.items() if k not in ("RETRAIN_UPLOADER_CONFIG", "NOTIFY_SOCKET")}


def _ledger_with_jobs(path: Path, count: int = 300) -> None:
    with Ledger(path) as ledger:
        for i in range(count):
            ledger.create_job(model="alpha", kind="csv", name=f"a{i}", sources=[f"a{i}.csv"],
                              upload_filename=f"a{i}.csv", inbox="/nowhere")


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def truncated(path: Path) -> None:
    _ledger_with_jobs(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)


def damaged_page(path: Path) -> None:
    """A page in the middle overwritten: the file opens and its schema reads; only a check (or a query) finds it."""
    _ledger_with_jobs(path)
    page = 4096
    with open(path, "r+b") as f:
        f.seek(page * (path.stat().st_size // page // 2) + 8)
        f.write(b"\xff" * 64)


def newer_schema(path: Path) -> None:
    _ledger_with_jobs(path, count=1)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()


DAMAGES: dict[str, Callable[[Path], None]] = {
    "garbage": garbage,
    "truncated": truncated,
    "damaged_page": damaged_page,
    "newer_schema": newer_schema,
}


def _run(args: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args, "--config", str(config)], capture_output=True, text=True, timeout=30,
                          env=_ENV, check=False)


@pytest.mark.parametrize("damage", DAMAGES)
def test_run_on_a_damaged_ledger_is_one_clear_line_and_an_exit_systemd_does_not_restart(
    tmp_path: Path, damage: str
) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.parent.mkdir(parents=True)
    DAMAGES[damage](ledger)
    before = ledger.read_bytes()
    done = _run(["run"], config)
    assert done.returncode == EXIT_LEDGER, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [error] = [r for r in records if r["level"] in ("error", "critical")]
    assert error["event"] == "ledger.damaged" and str(ledger) in error["error"] and "exception" not in error
    assert "newer" in error["error"] if damage == "newer_schema" else "damaged" in error["error"]
    assert ledger.read_bytes() == before  # nothing was written into the damaged file


@pytest.mark.parametrize("damage", ["garbage", "truncated", "newer_schema"])
@pytest.mark.parametrize("command", [["jobs"], ["status"]])
def test_read_only_commands_on_a_damaged_ledger_say_so_and_exit_1(tmp_path: Path, damage: str,
                                                                  command: list[str]) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.parent.mkdir(parents=True)
    DAMAGES[damage](ledger)
    done = _run(command, config)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"retrain-uploader: {ledger}:")


def test_the_daemon_checks_its_ledger_at_start_and_lets_go_of_its_lock(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    damaged_page(path)
    for _ in range(2):  # the second open is refused for the damage again, not for a lock the first one kept
        with pytest.raises(LedgerDamaged, match=r"quick_check|malformed"):
            Ledger(path, lock=True)


def foreign_database(path: Path) -> None:
    db = sqlite3.connect(path)  # another program's database, with a table of the same name
    db.execute("CREATE TABLE jobs(a, b)")
    db.commit()
    db.close()


def folder(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize("what", [foreign_database, folder], ids=["foreign-database", "folder"])
def test_something_else_at_the_ledger_path_is_one_clear_line_and_exit_4(tmp_path: Path, what: Any) -> None:
    # Found by review: both ended `run` with a traceback and exit 1 (a restart loop under systemd), and `jobs`
    # advised "start the daemon once to update it", which led into that crash.
    config = write_config(tmp_path, "http://127.0.0.1:9")
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.parent.mkdir(parents=True)
    what(ledger)
    done = _run(["run"], config)
    assert done.returncode == EXIT_LEDGER and "Traceback" not in done.stderr, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [error] = [r for r in records if r["level"] in ("error", "critical")]
    assert error["event"] == "ledger.damaged" and str(ledger) in error["error"]
    listing = _run(["jobs"], config)
    assert listing.returncode == 1 and "Traceback" not in listing.stderr
    assert "update it" not in listing.stderr


def _damage_an_index_leaf(path: Path, index: str = "jobs_created") -> None:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        page = db.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path DESC LIMIT 1", (index,)
        ).fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\xff" * 64)


async def test_damage_past_the_check_at_start_is_found_after_it_and_stops_the_daemon_with_exit_4(
    make_settings: Callable[..., Any],
) -> None:
    # Found by review: on a big ledger the check at start stops after CHECK_BUDGET_S; a damaged page beyond it was
    # met by every take (a traceback each, nothing taken, the daemon "healthy") and never said as damage.
    import asyncio

    from structlog.testing import capture_logs

    from retrain_uploader.service import Service

    settings = make_settings()
    _ledger_with_jobs(settings.ledger.path, 2000)
    _damage_an_index_leaf(settings.ledger.path)
    service = Service(settings, handle_signals=False, check_budget_s=0.0)  # cut short at once, as on a big ledger
    with capture_logs() as logs:
        status = await asyncio.wait_for(service.run(), timeout=20)
    events = [entry["event"] for entry in logs]
    assert status == EXIT_LEDGER
    assert events.index("ledger.check_cut_short") < events.index("service.started") < events.index("ledger.damaged")
    [damaged] = [entry for entry in logs if entry["event"] == "ledger.damaged"]
    assert "damaged" in damaged["error"] and str(settings.ledger.path) in damaged["error"]
    assert "restore a backup" in damaged["error"]


async def test_a_sound_ledger_checked_after_the_start_says_so_and_the_daemon_goes_on(
    make_settings: Callable[..., Any],
) -> None:
    import asyncio

    from structlog.testing import capture_logs

    from retrain_uploader.service import Service

    settings = make_settings()
    _ledger_with_jobs(settings.ledger.path, 2000)
    service = Service(settings, handle_signals=False, check_budget_s=0.0)
    with capture_logs() as logs:
        task = asyncio.create_task(service.run())
        for _ in range(200):
            if any(entry["event"] == "ledger.checked" for entry in logs) or task.done():
                break
            await asyncio.sleep(0.05)
        assert not task.done()
        service.request_stop()
        assert await asyncio.wait_for(task, timeout=15) == 0
    assert "ledger.damaged" not in [entry["event"] for entry in logs]


def test_a_damaged_page_the_check_at_start_did_not_reach_is_a_clear_ledger_error_at_run_time(tmp_path: Path) -> None:
    # Found by review: a write meeting a damaged page the check at start did not reach raised a bare DatabaseError
    # (a traceback at every take, the daemon "healthy"); it is the same LedgerDamaged as at start, and the daemon is
    # told (Service.ledger_damaged: one line, stop, exit 4).
    path = tmp_path / "ledger.sqlite3"
    _ledger_with_jobs(path, 2000)
    _damage_an_index_leaf(path)
    told: list[LedgerDamaged] = []
    ledger = Ledger(path, lock=True, check_budget_s=0.0)  # cut short, as on a big ledger
    try:
        assert not ledger.checked_fully
        ledger.on_damage = told.append
        with pytest.raises(LedgerDamaged):
            ledger.create_job(model="alpha", kind="csv", name="n", sources=["n.csv"], upload_filename="n.csv")
        assert len(told) == 1 and "restore a backup" in str(told[0])
    finally:
        ledger.close()
