"""`retrain-uploader status --check` as Nagios/Icinga run it: one line, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
A real daemon process holds (or does not hold) the ledger lock; the emulator pauses a model or fails a file."""

from __future__ import annotations

import time
from pathlib import Path

from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import Ledger, State

from ._proc import DaemonProcess, LedgerView, write_config
from .conftest import drop, wait_for
from .test_cli import CSV, RAGGED, Result, cli

KEYS = {"alpha": "key-alpha-0001", "beta": "key-beta-0002"}


async def check(config: Path) -> Result:
    result = await cli("status", "--check", "--config", config)
    assert result.out.count("\n") == 1 and result.out.startswith("RETRAIN-UPLOADER "), result  # one line
    assert result.err == "", result
    return result


def verdict(result: Result) -> tuple[int, str]:
    return result.code, result.out.split(" - ", 1)[0].removeprefix("RETRAIN-UPLOADER ")


async def test_ok_while_a_daemon_runs_critical_when_none_holds_the_ledger(tmp_path: Path, emulator: Emulator) -> None:
    config = write_config(tmp_path, emulator.base_url, keys=KEYS)
    never = await check(config)  # no daemon has ever run: there is not even a ledger
    assert verdict(never) == (2, "CRITICAL") and "no daemon holds the ledger lock" in never.out

    daemon = DaemonProcess(config, tmp_path)
    try:
        await daemon.start()
        drop(tmp_path / "inbox" / "alpha", "a.csv", CSV)
        await LedgerView(tmp_path / "state" / "ledger.sqlite3").all_closed(1)
        ok = await check(config)
        assert verdict(ok) == (0, "OK"), ok
        assert "2 model(s), 0 file(s) waiting" in ok.out and "failed_24h=0" in ok.out
        code, _ = await daemon.terminate()
        assert code == 0
        stopped = await check(config)
        assert verdict(stopped) == (2, "CRITICAL") and "no daemon holds the ledger lock" in stopped.out
        await daemon.start()
        assert verdict(await check(config)) == (0, "OK")
        await daemon.kill()  # a daemon killed -9 holds nothing: the kernel dropped its lock
        assert verdict(await check(config)) == (2, "CRITICAL")
    finally:
        await daemon.close()


async def test_critical_while_a_model_is_paused(tmp_path: Path, emulator: Emulator) -> None:
    emulator.set_key_state("key-beta-0002", "inactive")
    config = write_config(tmp_path, emulator.base_url, keys=KEYS)
    daemon = DaemonProcess(config, tmp_path)
    try:
        await daemon.start()
        drop(tmp_path / "inbox" / "beta", "b.csv", CSV)

        def paused() -> bool:
            with Ledger(tmp_path / "state" / "ledger.sqlite3") as ledger:
                return bool(ledger.models().get("beta", {}).get("paused_reason"))

        await wait_for(paused, what="beta paused")
        result = await check(config)
        assert verdict(result) == (2, "CRITICAL"), result
        assert "model beta paused: " in result.out and "Inactive_credential." in result.out
        assert "paused=1" in result.out
        plain = await cli("status", "--config", config)  # the report itself is still exit 0: it is not a check
        assert plain.code == 0 and "PAUSED" in plain.out
    finally:
        await daemon.close()


async def test_warning_for_a_job_failed_in_the_last_24_hours_not_an_older_one(
    tmp_path: Path, emulator: Emulator
) -> None:
    config = write_config(tmp_path, emulator.base_url, keys=KEYS)
    ledger_path = tmp_path / "state" / "ledger.sqlite3"
    daemon = DaemonProcess(config, tmp_path)
    try:
        await daemon.start()
        # A failure of two days ago, written beside the running daemon through the ledger's own API and clock.
        with Ledger(ledger_path, clock=lambda: time.time() - 2 * 86400) as ledger:
            old = ledger.create_job(model="alpha", kind="csv", name="o.csv", sources=["o.csv"], upload_filename="o.csv")
            ledger.update(old.id, state=State.FAILED, error="old failure", closed=1, event="state")
        assert verdict(await check(config)) == (0, "OK")

        drop(tmp_path / "inbox" / "alpha", "ragged.csv", RAGGED)
        [*_, job] = await LedgerView(ledger_path).all_closed(2)
        assert job["state"] == "failed"
        result = await check(config)
        assert verdict(result) == (1, "WARNING"), result
        assert f"1 job(s) failed in 24 h, last {job['id']} 'ragged.csv'" in result.out and "failed_24h=1" in result.out
    finally:
        await daemon.close()


async def test_warning_for_a_file_waiting_longer_than_alert_waiting_s(tmp_path: Path, emulator: Emulator) -> None:
    emulator.inject("upload_url", "http_status", times=10_000, status=503)  # the file stays in its inbox
    config = write_config(tmp_path, emulator.base_url, keys=KEYS, status={"alert_waiting_s": 0.5})
    daemon = DaemonProcess(config, tmp_path)
    try:
        await daemon.start()
        drop(tmp_path / "inbox" / "alpha", "stuck.csv", CSV)

        async def warned() -> Result | None:
            result = await check(config)
            return result if result.code == 1 else None

        deadline = time.monotonic() + 15
        result = None
        while result is None:  # the check itself is the condition: it turns WARNING once the file is 1 s old
            assert time.monotonic() < deadline, "no WARNING for a file waiting"
            result = await warned()
        assert verdict(result) == (1, "WARNING")
        assert "alpha: 'stuck.csv' waiting " in result.out and "oldest_waiting_s=" in result.out
        assert daemon.running
    finally:
        await daemon.close()


async def test_unknown_when_it_cannot_tell(tmp_path: Path, emulator: Emulator) -> None:
    config = write_config(tmp_path, emulator.base_url, keys=KEYS)
    ledger_path = tmp_path / "state" / "ledger.sqlite3"
    ledger_path.parent.mkdir(parents=True)
    ledger_path.write_bytes(b"this is not a database, it was overwritten by mistake\n" * 100)
    broken_ledger = await check(config)
    assert verdict(broken_ledger) == (3, "UNKNOWN"), broken_ledger
    assert "Traceback" not in broken_ledger.out

    config.write_text(config.read_text() + "\n[status]\nalert_waiting_s = -1\n")
    broken_config = await check(config)
    assert verdict(broken_config) == (3, "UNKNOWN"), broken_config
