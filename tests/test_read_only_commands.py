"""The commands that only look (status, jobs, jobs show, status --check) read a ledger they may not write: real
processes, a real SQLite file, a real read-only bind mount. Each test failed before these commands opened it
read-only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrain_uploader.ledger import Ledger

from ._proc import COMMAND

_ENV = {k: v for k, v in os.environ.items() if k != "RETRAIN_UPLOADER_CONFIG"}


@pytest.fixture
def readonly_ledger(tmp_path: Path) -> Iterator[Path]:
    """A config whose ledger (one closed job) sits on a read-only bind mount: what a monitoring user who may read
    the ledger but not write it sees. Skipped where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    state = tmp_path / "state"
    inbox = tmp_path / "inbox" / "alpha"
    inbox.mkdir(parents=True)
    (tmp_path / "key").write_text("key-alpha-0001\n")
    (tmp_path / "key").chmod(0o600)
    with Ledger(state / "ledger.sqlite3") as ledger:
        job = ledger.create_job(model="alpha", kind="csv", name="a", sources=["a.csv"], upload_filename="a.csv",
                                inbox=str(inbox.resolve()))
        ledger.update(job.id, closed=1)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[api]\nbase_url = "http://127.0.0.1:9"\n[ledger]\npath = {json.dumps(str(state / "ledger.sqlite3"))}\n'
        f'[[models]]\nname = "alpha"\ninbox = {json.dumps(str(inbox))}\n'
        f'api_key_file = {json.dumps(str(tmp_path / "key"))}\n'
    )
    config.chmod(0o600)
    done = subprocess.run(["mount", "--bind", str(state), str(state)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode(errors='replace').strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(state)], check=True, capture_output=True)
        yield config
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


@pytest.mark.parametrize(
    "args",
    [["status"], ["status", "--json"], ["jobs"], ["jobs", "--json"], ["jobs", "show", "1"]],
    ids=lambda a: " ".join(a),
)
def test_read_only_commands_read_a_ledger_they_may_not_write(readonly_ledger: Path, args: list[str]) -> None:
    """Promise 12: read-only CLI commands never crash. They open the ledger read-write (mkdir, journal_mode=WAL,
    a BEGIN IMMEDIATE migration transaction), so a ledger the caller may only read (a monitoring user, a read-only
    mount, a backup copy) ends them with a traceback: `sqlite3.OperationalError: unable to open database file`."""
    done = subprocess.run([*COMMAND, *args, "--config", str(readonly_ledger)], capture_output=True, text=True,
                          timeout=30, env=_ENV, check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-600:]}"
    assert "Traceback" not in done.stderr
    assert "a.csv" in done.stdout or args[0] == "status"


def test_status_check_reads_a_ledger_it_may_not_write(readonly_ledger: Path) -> None:
    """`status --check` run by a monitoring user who can read the ledger: UNKNOWN (3) 'unable to open database file'
    today, so the plugin can never report anything but UNKNOWN unless it runs with write access to the ledger."""
    done = subprocess.run([*COMMAND, "status", "--check", "--config", str(readonly_ledger)], capture_output=True,
                          text=True, timeout=30, env=_ENV, check=False)
    assert "cannot check" not in done.stdout, done.stdout
    assert done.returncode in (0, 1, 2), done.stdout
