"""The daemon as a real process: its TOML config, start / kill -9 / SIGTERM, its JSON log lines, and a read-only
look at its ledger (plain sqlite3, ``mode=ro``: the test never takes the daemon's lock or writes its database)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from retrain_uploader.config import Settings

from .conftest import wait_for

_SCRIPT = Path(sys.executable).parent / "retrain-uploader"
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "retrain_uploader.cli"]
# Variables that would make the child talk to a systemd or read another config than the one given.
_SCRUBBED_ENV = ("RETRAIN_UPLOADER_CONFIG", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


# -- config -------------------------------------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string
    raise TypeError(f"no TOML form for {value!r}")


def write_config(
    tmp_path: Path,
    base_url: str,
    *,
    keys: Mapping[str, str] | None = None,
    **sections: Mapping[str, object],
) -> Path:
    """``tmp_path/config.toml`` for a daemon against ``base_url``: fast settle and backoff, a ledger in tmp_path.

    ``keys`` maps model name -> API key (one key file each); ``sections`` override or add settings per section.
    """
    keys = dict(keys or {"alpha": "key-alpha-0001"})
    key_dir = tmp_path / "keys"
    key_dir.mkdir(exist_ok=True)
    raw: dict[str, dict[str, object]] = {
        "api": {"base_url": base_url, "connect_timeout_s": 2, "request_timeout_s": 5, "upload_read_timeout_s": 5},
        "ledger": {"path": tmp_path / "state" / "ledger.sqlite3"},
        "watch": {"settle_s": 0.1, "rescan_s": 0.5},
        "retry": {
            "base_delay_s": 0.05,
            "max_delay_s": 0.3,
            "max_attempts": 200,
            "paused_retry_s": 0.2,
            "unknown_outcome_wait_s": 0.2,
        },
        "pool": {"workers": 2, "shutdown_grace_s": 5},
    }
    if "status" in Settings.model_fields:  # the retrain tracker's section, where this version has one
        raw["status"] = {"poll_s": 0.2, "max_poll_delay_s": 0.5}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {_toml_value(value)}" for name, value in values.items()]
        lines.append("")
    for model, key in keys.items():
        key_file = key_dir / model
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        lines += [
            "[[models]]",
            f"name = {_toml_value(model)}",
            f"inbox = {_toml_value(tmp_path / 'inbox' / model)}",
            f"api_key_file = {_toml_value(key_file)}",
            "",
        ]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    path.chmod(0o600)
    Settings.from_toml(path)  # fail here, not in the child, if the text is wrong
    return path


# -- the ledger, read-only ----------------------------------------------------------------------------------------


class LedgerView:
    """Reads the daemon's ledger through a fresh read-only connection per call (never a stale snapshot)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0)
        try:
            db.row_factory = sqlite3.Row
            try:
                return [dict(row) for row in db.execute(sql, tuple(args))]
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):  # created, not yet migrated
                    return []
                raise
        finally:
            db.close()

    def jobs(self) -> list[dict[str, Any]]:
        jobs = self._rows("SELECT * FROM jobs ORDER BY id")
        for job in jobs:
            job["sources"] = json.loads(job["sources"])
            job["moved_to"] = json.loads(job["moved_to"])
        return jobs

    def events(self, job_id: int | None = None, event: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM job_events WHERE 1=1", []
        if job_id is not None:
            sql, args = sql + " AND job_id = ?", [*args, job_id]
        if event is not None:
            sql, args = sql + " AND event = ?", [*args, event]
        rows = self._rows(sql + " ORDER BY id", args)
        for row in rows:
            row["detail"] = json.loads(row["detail"] or "null")
        return rows

    def unclosed(self) -> list[dict[str, Any]]:
        return [job for job in self.jobs() if not job["closed"]]

    async def all_closed(self, count: int, timeout: float = 30.0, why: str = "") -> list[dict[str, Any]]:
        """Wait until at least ``count`` jobs exist and every one is closed."""

        def done() -> list[dict[str, Any]] | None:
            jobs = self.jobs()
            return jobs if len(jobs) >= count and all(job["closed"] for job in jobs) else None

        result: list[dict[str, Any]] = await wait_for(done, timeout, f"{count} closed job(s) {why}")
        return result


# -- the process --------------------------------------------------------------------------------------------------


class DaemonProcess:
    """``retrain-uploader run --config CONFIG`` as a child process; each start logs to its own file,
    ``LOG_DIR/NAME-runN.log`` (give each process of a test its own ``name``)."""

    def __init__(self, config: Path, log_dir: Path, name: str = "daemon") -> None:
        self.config = config
        self.log_dir = log_dir
        self.name = name
        self.logs: list[Path] = []
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(
        self, *, ready: bool = True, timeout: float = 20.0, env: Mapping[str, str] | None = None,
        args: Iterable[str] = (), ready_event: str = "service.started",
    ) -> DaemonProcess:
        """Start a new run; with ``ready``, wait for its ``ready_event`` line (``service.started``: recovery is done
        by then). ``env`` adds or overrides environment variables of the child (e.g. its log level); ``args`` are
        added to ``run`` (e.g. ``--dry-run``)."""
        assert not self.running, "still running"
        log_path = self.log_dir / f"{self.name}-run{len(self.logs) + 1}.log"
        self.logs.append(log_path)
        child_env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        child_env["RETRAIN_UPLOADER_LOG_LEVEL"] = "info"
        child_env.update(env or {})
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe must never stall the daemon
            self.proc = await asyncio.create_subprocess_exec(
                *COMMAND, "run", *args, "--config", str(self.config),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log, env=child_env,
            )
        if ready:
            await wait_for(
                lambda: not self.running or self.logged(ready_event), timeout, "the daemon to start"
            )
            if not self.running:
                raise AssertionError(f"the daemon exited with {self.returncode} at start:\n{self.tail()}")
        return self

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        self._close_transport()
        return code

    async def kill(self) -> None:
        """kill -9 and reap."""
        assert self.running and self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        code = await self.wait()
        assert code == -signal.SIGKILL, f"exit {code}"

    async def terminate(self, timeout: float = 20.0) -> tuple[int, float]:
        """SIGTERM; returns the exit code and how long the process took to exit."""
        assert self.running and self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = await self.wait(timeout)
        return code, time.monotonic() - started

    async def close(self) -> None:
        """Teardown: whatever state the test left it in, no process survives."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 20)
        self._close_transport()

    def _close_transport(self) -> None:
        transport = getattr(self.proc, "_transport", None)
        if transport is not None:
            transport.close()

    def records(self, run: int = -1) -> list[dict[str, Any]]:
        """The JSON log lines of one run (default: the current one)."""
        if not self.logs or not self.logs[run].exists():
            return []
        records = []
        for line in self.logs[run].read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def logged(self, event: str, run: int = -1) -> list[dict[str, Any]]:
        return [r for r in self.records(run) if r.get("event") == event]

    def text(self, run: int = -1) -> str:
        return self.logs[run].read_text(encoding="utf-8", errors="replace") if self.logs else ""

    def tail(self, lines: int = 60) -> str:
        """The last lines of every run's log, for assertion messages."""
        out = []
        for path in self.logs:
            text = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {path.name} ---")
            out += text[-lines:]
        return "\n".join(out)
