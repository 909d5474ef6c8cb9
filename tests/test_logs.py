"""What reaches stderr and the log file, read from real processes: one JSON object per line whoever wrote it (our
events, stdlib loggers, warnings, uncaught exceptions), no credential in any of them, and no line that fails to
encode (a file name that is not UTF-8)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from retrain_uploader.emulator import Emulator

from ._proc import DaemonProcess, LedgerView, write_config
from .conftest import drop, wait_for

SIGNATURE = "5ec2e75160a7u2e0ffee5ec2e7"  # distinctive: found anywhere means leaked
CREDENTIAL = "AKIAEXAMPLE7QUE"
API_KEY = "key-alpha-0001"
CSV = "id,age,plan\n1,34,basic\n2,51,premium\n"


def parse_lines(text: str, where: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object with the fields every line has; fails naming the first that is not."""
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{where} line {n} is not JSON: {line!r}")
        assert isinstance(record, dict) and {"event", "level", "timestamp"} <= record.keys(), (where, n, line)
        records.append(record)
    return records


def assert_no_secret(blob: bytes, where: str) -> None:
    for secret in (SIGNATURE, CREDENTIAL, API_KEY):
        assert secret.encode() not in blob, f"{secret} leaked into {where}"


async def test_a_signature_in_a_truncated_200_body_reaches_no_log_line_ledger_or_error_file(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    # The upload_url answer is a 200 cut off mid-URL, the URL JSON-escaped (`https:\/\/`) and its parameters joined
    # by an escaped `\u0026`: the two forms the scrubber used to miss.
    body = (
        '{"retrain_job_id": "r-1", "upload_url": "https:\\/\\/s3.example\\/b\\/churn.csv?'
        f"X-Amz-Date=20261201\\u0026X-Amz-Credential={CREDENTIAL}%2F20261201"
        f"\\u0026X-Amz-Signature={SIGNATURE}"
    )
    assert len(body) < 200  # the client keeps a 200-character excerpt of a body it cannot parse
    emulator.inject("upload_url", "http_status", times=3, status=200, body=body, content_type="application/json")
    log_file = tmp_path / "log" / "daemon.jsonl"
    config = write_config(
        tmp_path,
        emulator.base_url,
        retry={"max_attempts": 3},
        logging={"file": log_file},
    )
    d: DaemonProcess = daemons(config)
    # debug, and asyncio's debug mode: the loop's own stdlib record ("Using selector") must come out as JSON too
    await d.start(env={"RETRAIN_UPLOADER_LOG_LEVEL": "debug", "PYTHONASYNCIODEBUG": "1"})
    inbox = tmp_path / "inbox" / "alpha"
    drop(inbox, "churn.csv", CSV)
    ledger = LedgerView(tmp_path / "state" / "ledger.sqlite3")
    [job] = await ledger.all_closed(1, why="after three unusable answers")
    assert job["state"] == "failed" and "not JSON" in job["error"], job
    assert "X-Amz-Signature=<redacted>" in job["error"], job["error"]  # scrubbed, not dropped: still diagnosable
    code, _ = await d.terminate()
    assert code == 0

    stderr = parse_lines(d.text(), "stderr")
    in_file = parse_lines(log_file.read_text(encoding="utf-8"), "log file")
    assert [r["event"] for r in in_file] == [r["event"] for r in stderr]
    assert any(r.get("logger") == "asyncio" and r["event"].startswith("Using selector") for r in stderr), d.tail()
    assert any("X-Amz-Signature=<redacted>" in json.dumps(r) for r in stderr), "the failure was not logged"

    assert_no_secret(d.logs[-1].read_bytes(), "stderr")
    assert_no_secret(log_file.read_bytes(), "the log file")
    for path in (tmp_path / "state").iterdir():  # the database, its WAL and journal, read raw
        assert_no_secret(path.read_bytes(), path.name)
    error_files = list((inbox / "failed").glob("*.error.json"))
    assert error_files, sorted(p.name for p in inbox.rglob("*"))
    for path in error_files:
        assert_no_secret(path.read_bytes(), path.name)


_PROBE = """
import asyncio, gc, logging, sys, threading, warnings
from pathlib import Path
import structlog
from retrain_uploader.logs import configure, run_main

configure(level="info", file=Path(sys.argv[1]))
url = "https://storage.example/b/k.csv?X-Amz-Credential=CRED&X-Amz-Signature=SIG"
logging.getLogger("aiohttp.client").warning("connection to %s lost", url)
logging.getLogger("aiohttp.client").info("below the stdlib level: not written")
logging.getLogger("aiohttp.client").error("bad args %d", "not a number")
warnings.warn("deprecated, see " + url.replace("/", "\\\\/"), UserWarning, stacklevel=1)
structlog.get_logger("retrain_uploader.probe").info("file.seen", name="bad\\udcffname.csv")

async def main():
    async def crash():
        raise RuntimeError("PUT to " + url + " failed")
    task = asyncio.ensure_future(crash())
    await asyncio.sleep(0.05)
    del task
    gc.collect()  # an exception no one retrieved is reported when its task is collected
    asyncio.get_running_loop().call_soon(lambda: 1 / 0)
    await asyncio.sleep(0.05)

run_main(main())
def work():
    raise ValueError("thread " + url)

thread = threading.Thread(target=work, name="worker")
thread.start()
thread.join()
raise KeyError("crash " + url)
"""


async def test_stdlib_records_warnings_and_uncaught_exceptions_are_scrubbed_json_lines(tmp_path: Path) -> None:
    probe = _PROBE.replace("CRED", CREDENTIAL).replace("SIG", SIGNATURE)
    log_file = tmp_path / "probe.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", probe, str(log_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},  # strict UTF-8: a lone surrogate would raise
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1 and out == b""  # the uncaught KeyError still ends the process with 1
    assert_no_secret(err, "stderr")
    assert_no_secret(log_file.read_bytes(), "the log file")
    stderr = parse_lines(err.decode(), "stderr")
    assert stderr == parse_lines(log_file.read_text(encoding="utf-8"), "log file")
    summary = [(r["event"].split(" ")[0] if r["logger"] != "py.warnings" else "<warning>", r["level"], r["logger"])
               for r in stderr]  # fmt: skip
    assert summary == [
        ("connection", "warning", "aiohttp.client"),
        ("logging.record_unformattable", "error", "aiohttp.client"),
        ("<warning>", "warning", "py.warnings"),
        ("file.seen", "info", "retrain_uploader.probe"),
        ("asyncio.unhandled_exception", "error", "asyncio"),
        ("asyncio.unhandled_exception", "error", "asyncio"),
        ("thread.uncaught_exception", "error", "retrain_uploader"),
        ("process.uncaught_exception", "critical", "retrain_uploader"),
    ]
    by_event = {r["event"].split(" ")[0]: r for r in stderr}
    assert by_event["connection"]["event"] == ("connection to https://storage.example/b/k.csv?<redacted> lost")
    assert "UserWarning: deprecated, see https:\\/\\/storage.example\\/b\\/k.csv?<redacted>" in stderr[2]["event"]
    assert by_event["file.seen"]["name"] == "bad\udcffname.csv"  # the str back, surrogate and all
    assert b'"bad\\udcffname.csv"' in err  # ... written as a JSON escape, so the line encodes as UTF-8
    task_error, callback_error = (r for r in stderr if r["event"] == "asyncio.unhandled_exception")
    assert task_error["message"] == "Task exception was never retrieved"
    assert "RuntimeError: PUT to https://storage.example/b/k.csv?<redacted> failed" in task_error["exception"]
    assert "ZeroDivisionError" in callback_error["exception"]
    assert (
        "ValueError: thread https://storage.example/b/k.csv?<redacted>"
        in by_event["thread.uncaught_exception"]["exception"]
    )
    assert "KeyError: 'crash https://storage.example/b/k.csv?<redacted>'" in stderr[-1]["exception"]


async def test_a_file_name_that_is_not_utf8_does_not_stop_the_model_when_logging_to_a_file(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    log_file = tmp_path / "log" / "daemon.jsonl"
    config = write_config(tmp_path, emulator.base_url, logging={"file": log_file})
    d: DaemonProcess = daemons(config)
    await d.start(env={"PYTHONIOENCODING": "utf-8"})
    inbox = tmp_path / "inbox" / "alpha"
    bad = os.fsdecode(b"bad\xff.csv")
    drop(inbox, bad, CSV)
    bad_logged: list[dict[str, Any]] = []

    shown = "bad\\xff.csv"  # how the daemon names it (the ledger cannot store the raw bytes either)

    def names_it(r: dict[str, Any]) -> bool:
        return any(isinstance(v, str) and (bad in v or shown in v) for v in r.values())

    def bad_name_logged() -> bool:
        bad_logged[:] = [r for r in d.records() if names_it(r)]
        return bool(bad_logged)

    await wait_for(bad_name_logged, 15, "a line naming the file")
    drop(inbox, "good.csv", "id,age,plan\n3,22,basic\n")
    ledger = LedgerView(tmp_path / "state" / "ledger.sqlite3")
    await wait_for(
        lambda: any(j["upload_filename"] == "good.csv" and j["closed"] for j in ledger.jobs()),
        20,
        "the next file to be uploaded",
    )
    assert d.running, d.tail()
    parse_lines(d.text(), "stderr")
    in_file = parse_lines(log_file.read_text(encoding="utf-8"), "log file")
    assert any(names_it(r) for r in in_file), "the bad name is missing from the file"
