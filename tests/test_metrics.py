"""`GET /healthz` and `GET /metrics` over real HTTP on loopback, from a real service against the emulator."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import aiohttp

from retrain_uploader.emulator import Emulator

from .conftest import drop, wait_for
from .test_cli import CSV, StartDaemon


async def get(port: int, path: str) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        text = await resp.text()
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, text, body


def samples(text: str) -> dict[str, float]:
    """The exposition's samples, `name{labels}` -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_healthz_answers_200_with_the_paused_models(start_daemon: StartDaemon, emulator: Emulator) -> None:
    emulator.set_key_state("key-beta-0002", "inactive")
    d = await start_daemon(metrics={"enabled": True, "port": 0})
    assert d.service.metrics_port
    status, _, body = await get(d.service.metrics_port, "/healthz")
    assert (status, body) == (200, {"status": "ok", "ledger_writable": True, "problems": [], "paused_models": []})

    drop(d.inbox("beta"), "b.csv", CSV)
    await wait_for(lambda: d.service.models["beta"].paused_reason, what="beta paused")
    status, _, body = await get(d.service.metrics_port, "/healthz")
    assert status == 200  # paused is a state to report, not a dead daemon
    [paused] = body["paused_models"]
    assert paused["model"] == "beta" and "Inactive_credential." in paused["reason"] and paused["since"]
    assert "key-beta-0002" not in str(body)


async def test_healthz_is_503_while_the_ledger_cannot_be_written(
    start_daemon: StartDaemon, emulator: Emulator
) -> None:
    d = await start_daemon(metrics={"enabled": True, "port": 0})
    assert d.service.metrics_port
    # Another process holds the ledger's write lock (a stuck sqlite3 shell, a backup tool): no step could commit.
    other = sqlite3.connect(d.settings.ledger.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        status, _, body = await get(d.service.metrics_port, "/healthz")
        assert time.monotonic() - started < 10  # bounded, and the daemon's loop was never stalled by it
        assert status == 503 and body["status"] == "unhealthy" and body["ledger_writable"] is False
        assert "database is locked" in body["problems"][0]
        metrics_status, _, _ = await get(d.service.metrics_port, "/metrics")  # the loop still answers meanwhile
        assert metrics_status == 200
    finally:
        other.execute("ROLLBACK")
        other.close()
    status, _, body = await get(d.service.metrics_port, "/healthz")
    assert (status, body["status"]) == (200, "ok")


async def test_metrics_have_process_metrics_the_oldest_waiting_file_and_the_last_success(
    start_daemon: StartDaemon, emulator: Emulator
) -> None:
    emulator.set_key_state("key-beta-0002", "inactive")  # beta's files stay in its inbox
    d = await start_daemon(metrics={"enabled": True, "port": 0})
    assert d.service.metrics_port
    old = drop(d.inbox("beta"), "old.csv", CSV)
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    before = time.time()
    drop(d.inbox("alpha"), "a.csv", CSV)
    await wait_for(lambda: any(j.closed and j.model == "alpha" for j in d.jobs()), what="alpha's upload")

    status, text, _ = await get(d.service.metrics_port, "/metrics")
    assert status == 200
    got = samples(text)
    assert got["process_resident_memory_bytes"] > 1 << 20
    assert got["process_open_fds"] >= 3
    assert abs(got["process_start_time_seconds"] - time.time()) < 600
    assert got['retrain_uploader_oldest_waiting_file_age_seconds{model="beta"}'] >= 3600
    assert got['retrain_uploader_oldest_waiting_file_age_seconds{model="alpha"}'] == 0
    assert before - 1 <= got['retrain_uploader_last_success_timestamp_seconds{model="alpha"}'] <= time.time() + 1
    assert 'retrain_uploader_last_success_timestamp_seconds{model="beta"}' not in got  # never succeeded
    assert got['retrain_uploader_uploads_total{model="alpha"}'] == 1
    assert "# TYPE retrain_uploader_last_success_timestamp_seconds gauge" in text
