"""`GET /healthz` and `GET /metrics` over real HTTP on loopback, from a real service against the emulator."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
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


async def test_healthz_reads_only_the_cheap_health_state_never_the_scrape_snapshot(tmp_path: Path) -> None:
    """A probe every few seconds must not count a million jobs nor list every inbox on the event loop: /healthz
    reads the ``health`` callable; only /metrics builds the full snapshot."""
    from retrain_uploader.metrics import Metrics, MetricsServer, Snapshot

    calls = {"snapshot": 0, "health": 0}

    def snapshot() -> Snapshot:
        calls["snapshot"] += 1
        return Snapshot(jobs={"alpha": {"finished": 3}}, paused={"alpha": None}, ledger_path=tmp_path / "l.sqlite3")

    def health() -> Snapshot:
        calls["health"] += 1
        return Snapshot(jobs={}, paused={"alpha": "Inactive_credential."}, ledger_path=tmp_path / "l.sqlite3",
                        paused_at={"alpha": "2026-12-01T00:00:00.000Z"})

    sqlite3.connect(tmp_path / "l.sqlite3").close()
    server = MetricsServer(Metrics(), snapshot, health=health, port=0)
    await server.start()
    try:
        for _ in range(3):
            status, _, body = await get(server.port, "/healthz")
            assert status == 200 and body["paused_models"] == [
                {"model": "alpha", "reason": "Inactive_credential.", "since": "2026-12-01T00:00:00.000Z"}
            ]
        assert calls == {"snapshot": 0, "health": 3}
        status, text, _ = await get(server.port, "/metrics")
        assert status == 200 and samples(text)['retrain_uploader_jobs{model="alpha",state="finished"}'] == 3.0
        assert calls == {"snapshot": 1, "health": 3}
    finally:
        await server.stop()
