"""Issue 4 through the real process: sd_notify, watchdog, SIGTERM, SIGHUP reload, credentials, online key check."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from retrain_uploader.config import Settings
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import AFTER_UPLOAD, Ledger

from .conftest import KEYS, drop, wait_for

CSV = "id,v\n1,a\n2,b\n"
EXE = str(Path(sys.executable).parent / "retrain-uploader")


def write_config(path: Path, base_url: str, models: list[dict[str, str]], **extra: str) -> Path:
    lines = [
        "[api]",
        f'base_url = "{base_url}"',
        "request_timeout_s = 5",
        "[ledger]",
        f'path = "{path.parent / "state" / "ledger.sqlite3"}"',
        "[watch]",
        "settle_s = 0.05",
        "rescan_s = 0.5",
        "[retry]",
        "base_delay_s = 0.01",
        "max_delay_s = 0.05",
        f"paused_retry_s = {extra.get('paused_retry_s', 3600)}",
        "[pool]",
        "workers = 2",
        "shutdown_grace_s = 10",
        "[status]",
        "poll_s = 3600",
    ]
    for model in models:
        lines.append("[[models]]")
        lines += [f'{key} = "{value}"' for key, value in model.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def uploaded(ledger_path: Path, model: str) -> int:
    if not ledger_path.exists():
        return 0
    with Ledger(ledger_path) as ledger:
        return sum(1 for j in ledger.jobs(model=model) if j.state in AFTER_UPLOAD and j.closed)


def paused_reason(ledger_path: Path, model: str) -> str | None:
    if not ledger_path.exists():
        return None
    with Ledger(ledger_path) as ledger:
        reason: str | None = ledger.models().get(model, {}).get("paused_reason")
        return reason


@pytest.fixture
async def notify_socket(tmp_path: Path) -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()


def received(sock: socket.socket, into: list[str]) -> list[str]:
    while True:
        try:
            into.extend(sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return into


async def start(config: Path, tmp_path: Path, **env: str) -> asyncio.subprocess.Process:
    log = open(tmp_path / "daemon.log", "ab")  # noqa: SIM115 -- closed by the process fixture below
    try:
        return await asyncio.create_subprocess_exec(
            EXE,
            "run",
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, **env},
        )
    finally:
        log.close()


async def finish(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    if proc.returncode is None:
        proc.send_signal(sig)
    return await asyncio.wait_for(proc.wait(), timeout)


async def test_notify_ready_watchdog_status_and_a_clean_sigterm(
    tmp_path: Path, emulator: Emulator, notify_socket: socket.socket
) -> None:
    key = tmp_path / "alpha.key"
    key.write_text("key-alpha-0001")
    config = write_config(
        tmp_path / "c.toml",
        emulator.base_url,
        [{"name": "alpha", "inbox": str(tmp_path / "in"), "api_key_file": str(key)}],
    )
    proc = await start(config, tmp_path, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="200000")
    messages: list[str] = []
    try:
        await wait_for(lambda: "READY=1" in received(notify_socket, messages), what="READY=1")
        await wait_for(lambda: received(notify_socket, messages).count("WATCHDOG=1") >= 3, what="3 watchdog pings")
        assert any(m.startswith("STATUS=") and "queued" in m for m in messages)
    finally:
        code = await finish(proc)
    assert code == 0
    assert "STOPPING=1" in received(notify_socket, messages)


async def test_status_follows_each_job_start_and_end_without_waiting_for_a_watchdog_ping(
    tmp_path: Path, emulator: Emulator, notify_socket: socket.socket
) -> None:
    key = tmp_path / "alpha.key"
    key.write_text("key-alpha-0001")
    config = write_config(
        tmp_path / "c.toml",
        emulator.base_url,
        [{"name": "alpha", "inbox": str(tmp_path / "in"), "api_key_file": str(key)}],
    )
    proc = await start(config, tmp_path, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))  # no WATCHDOG_USEC: no pings
    messages: list[str] = []
    try:
        await wait_for(lambda: "READY=1" in received(notify_socket, messages), what="READY=1")
        (tmp_path / "in" / "a.csv").write_text("id,x\n1,2\n")

        def statuses() -> list[str]:
            return [m for m in received(notify_socket, messages) if m.startswith("STATUS=")]

        await wait_for(lambda: any("1 in flight" in m for m in statuses()), what="STATUS with the job in flight")
        await wait_for(lambda: emulator.uploads and "0 in flight" in statuses()[-1], what="STATUS after the job ended")
        assert "0 queued, 0 in flight, 0 open" in statuses()[-1]
    finally:
        code = await finish(proc)
    assert code == 0


async def test_sighup_adds_a_model_and_picks_up_a_fixed_key(tmp_path: Path, emulator: Emulator) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "alpha").write_text("wrong-key-000")
    (keys / "beta").write_text("key-beta-0002")
    alpha = {"name": "alpha", "inbox": str(tmp_path / "in" / "alpha"), "api_key_file": str(keys / "alpha")}
    beta = {"name": "beta", "inbox": str(tmp_path / "in" / "beta"), "api_key_file": str(keys / "beta")}
    config = write_config(tmp_path / "c.toml", emulator.base_url, [alpha])
    ledger = tmp_path / "state" / "ledger.sqlite3"
    drop(Path(alpha["inbox"]), "a.csv", CSV)
    drop(Path(beta["inbox"]), "b.csv", CSV + "3,c\n")
    proc = await start(config, tmp_path)
    try:
        await wait_for(lambda: paused_reason(ledger, "alpha"), what="alpha paused by its wrong key")
        (keys / "alpha").write_text("key-alpha-0001")
        write_config(config, emulator.base_url, [alpha, beta])
        proc.send_signal(signal.SIGHUP)
        # paused_retry_s is an hour: only the reload can have resumed alpha this fast
        await wait_for(
            lambda: uploaded(ledger, "alpha") == 1 and uploaded(ledger, "beta") == 1,
            timeout=20,
            what="both models uploaded after SIGHUP",
        )
        config.write_text("this is [not toml")
        proc.send_signal(signal.SIGHUP)
        drop(Path(alpha["inbox"]), "a2.csv", CSV + "4,d\n")
        await wait_for(lambda: uploaded(ledger, "alpha") == 2, what="old config still running")
    finally:
        code = await finish(proc)
    assert code == 0
    events = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "model.added" in names and "config.reload_refused" in names
    assert sorted(u.filename for u in emulator.uploads) == ["a.csv", "a2.csv", "b.csv"]


async def test_keys_from_systemd_credentials(tmp_path: Path, emulator: Emulator) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "churn").write_text("key-alpha-0001\n")
    inbox = tmp_path / "in"
    config = write_config(
        tmp_path / "c.toml", emulator.base_url, [{"name": "churn", "inbox": str(inbox), "api_key_credential": "churn"}]
    )
    drop(inbox, "x.csv", CSV)
    proc = await start(config, tmp_path, CREDENTIALS_DIRECTORY=str(creds))
    try:
        await wait_for(lambda: uploaded(tmp_path / "state" / "ledger.sqlite3", "churn") == 1, what="upload")
    finally:
        assert await finish(proc) == 0
    assert [u.filename for u in emulator.uploads] == ["x.csv"]


async def test_in_process_reload_refuses_a_bad_config_and_stops_removed_models(
    tmp_path: Path, emulator: Emulator, start_daemon
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "alpha").write_text("key-alpha-0001")
    (keys / "beta").write_text("key-beta-0002")
    alpha = {"name": "alpha", "inbox": str(tmp_path / "ia"), "api_key_file": str(keys / "alpha")}
    beta = {"name": "beta", "inbox": str(tmp_path / "ib"), "api_key_file": str(keys / "beta")}
    config = write_config(tmp_path / "c.toml", emulator.base_url, [alpha, beta])
    d = await start_daemon(Settings.from_toml(config))
    write_config(config, emulator.base_url, [alpha])
    with capture_logs() as logs:
        assert d.service.reload() is True
        drop(Path(beta["inbox"]), "late.csv", CSV)
        drop(Path(alpha["inbox"]), "a.csv", CSV)
        await d.closed_jobs(1)
        config.write_text("[[models]]\nname = 'x y'\n")
        assert d.service.reload() is False
    assert [j.model for j in d.jobs()] == ["alpha"]
    assert (Path(beta["inbox"]) / "late.csv").exists()  # not taken: beta was removed
    refused = [e for e in logs if e["event"] == "config.reload_refused"]
    assert len(refused) == 1 and "models[0]" in refused[0]["error"]
    assert d.service.settings.model("alpha")  # the running config stayed


async def test_check_config_online_creates_no_job(tmp_path: Path, emulator: Emulator) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "good").write_text(next(iter(KEYS)))
    (keys / "bad").write_text("not-a-key-999")
    config = write_config(
        tmp_path / "c.toml",
        emulator.base_url,
        [
            {"name": "good", "inbox": str(tmp_path / "g"), "api_key_file": str(keys / "good")},
            {"name": "bad", "inbox": str(tmp_path / "b"), "api_key_file": str(keys / "bad")},
        ],
    )
    proc = await asyncio.create_subprocess_exec(
        EXE,
        "check-config",
        "--online",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"models.bad: the API rejected the key: invalid_api_key." in err
    assert b"models.good" not in err
    assert b"not-a-key-999" not in out + err
    assert {r.endpoint for r in emulator.requests} == {"status"}
    assert emulator.jobs == {}


async def test_log_file_follows_logrotate(tmp_path: Path, emulator: Emulator) -> None:
    key = tmp_path / "alpha.key"
    key.write_text("key-alpha-0001")
    inbox = tmp_path / "in"
    config = write_config(
        tmp_path / "c.toml", emulator.base_url, [{"name": "alpha", "inbox": str(inbox), "api_key_file": str(key)}]
    )
    log_file = tmp_path / "log" / "daemon.log"
    config.write_text(config.read_text().replace("[pool]", f'[logging]\nfile = "{log_file}"\n[pool]'))
    ledger = tmp_path / "state" / "ledger.sqlite3"
    proc = await start(config, tmp_path)
    try:
        drop(inbox, "one.csv", CSV)
        await wait_for(lambda: uploaded(ledger, "alpha") == 1, what="first upload")
        log_file.rename(log_file.with_suffix(".log.1"))  # what logrotate does (without copytruncate)
        drop(inbox, "two.csv", CSV + "3,c\n")
        await wait_for(lambda: uploaded(ledger, "alpha") == 2, what="second upload")
        await wait_for(lambda: log_file.exists() and "two.csv" in log_file.read_text(), what="new log file")
    finally:
        assert await finish(proc) == 0
    rotated = log_file.with_suffix(".log.1").read_text()
    assert "one.csv" in rotated and "two.csv" not in rotated
    assert all(json.loads(line)["event"] for line in log_file.read_text().splitlines())
    assert "key-alpha-0001" not in rotated + log_file.read_text()


async def test_prometheus_endpoint(start_daemon, emulator: Emulator) -> None:
    emulator.inject("upload_url", "http_status", status=503)
    d = await start_daemon(metrics={"enabled": True, "port": 0})
    assert d.service.metrics_port
    drop(d.inbox(), "m.csv", CSV)
    await d.closed_jobs(1)
    url = f"http://127.0.0.1:{d.service.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    lines = set(text.splitlines())
    assert 'retrain_uploader_files_seen_total{model="alpha"} 1.0' in lines  # prometheus_client writes floats
    assert 'retrain_uploader_uploads_total{model="alpha"} 1.0' in lines
    assert f'retrain_uploader_upload_bytes_total{{model="alpha"}} {float(len(CSV))}' in lines
    assert 'retrain_uploader_retries_total{model="alpha",state="requesting"} 1.0' in lines
    assert 'retrain_uploader_model_paused{model="beta"} 0.0' in lines
    assert 'retrain_uploader_upload_duration_seconds_count{model="alpha"} 1.0' in lines
    assert any(line.startswith('retrain_uploader_jobs{model="alpha",state=') for line in lines)


async def test_a_start_up_failure_is_one_clear_line_and_exit_1(tmp_path: Path, emulator: Emulator) -> None:
    key = tmp_path / "alpha.key"
    key.write_text("key-alpha-0001")
    config = write_config(
        tmp_path / "c.toml",
        emulator.base_url,
        [{"name": "alpha", "inbox": str(tmp_path / "in"), "api_key_file": str(key)}],
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config.write_text(config.read_text().replace("[pool]", f"[metrics]\nenabled = true\nport = {port}\n[pool]"))
        proc = await asyncio.create_subprocess_exec(
            EXE, "run", "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 1
    records = [json.loads(line) for line in err.decode().splitlines()]  # every line one JSON object
    [failure] = [r for r in records if r["event"] == "service.cannot_start"]
    assert failure["error"].startswith("cannot start: ") and failure["level"] == "error"
    assert b"Traceback" not in err
