"""The journal as the operator's console: when stderr is the journal, each record goes out with the native protocol
(PRIORITY, EVENT, MODEL, JOB_ID, RETRAIN_JOB_ID; MESSAGE the same JSON line), start-up errors included. Proven here
with a real datagram socket standing in for journald's and the real daemon process; tests/test_systemd_boot.py runs
it under a real systemd where the machine allows."""

from __future__ import annotations

import array
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from retrain_uploader.emulator import Emulator
from retrain_uploader.journal import JournalSender, _encode, journal_fields, stderr_is_journal

from ._proc import COMMAND, write_config
from .conftest import drop, wait_for


def _decode(datagram: bytes) -> dict[str, str]:
    """The native protocol's two forms: KEY=value lines, and KEY\\n + 64-bit LE length + bytes + \\n."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", datagram[nl + 1 : nl + 9])
            fields[line.decode()] = datagram[nl + 9 : nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return fields


class FakeJournald:
    """A bound AF_UNIX datagram socket, as journald's /run/systemd/journal/socket is; reads every record sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.records: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            fds = array.array("i")
            try:
                data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
            except BlockingIOError:
                return self.records
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
            for fd in fds:
                with os.fdopen(fd, "rb") as f:
                    data = os.pread(f.fileno(), os.fstat(f.fileno()).st_size, 0)  # as journald maps it
            self.records.append(_decode(data))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[FakeJournald]:
    j = FakeJournald(tmp_path / "journal.sock")
    yield j
    j.close()


# -- the record of one line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "priority"), [("critical", "2"), ("error", "3"), ("warning", "4"), ("info", "6"), ("debug", "7")]
)
def test_priority_comes_from_the_level(level: str, priority: str) -> None:
    line = json.dumps({"event": "x.y", "level": level})
    assert journal_fields(line)["PRIORITY"] == priority


def test_fields_of_a_job_line_and_message_is_the_line_itself() -> None:
    line = json.dumps({"event": "upload.finished", "level": "info", "model": "churn", "job_id": 7,
                       "retrain_job_id": "r-1", "file": "a.csv"})
    assert journal_fields(line) == {
        "MESSAGE": line, "PRIORITY": "6", "SYSLOG_IDENTIFIER": "retrain-uploader",
        "EVENT": "upload.finished", "MODEL": "churn", "JOB_ID": "7", "RETRAIN_JOB_ID": "r-1",
    }


def test_a_line_that_is_not_json_still_goes_out_at_info() -> None:
    assert journal_fields("plain text") == {"MESSAGE": "plain text", "PRIORITY": "6",
                                            "SYSLOG_IDENTIFIER": "retrain-uploader"}


def test_values_with_newlines_use_the_binary_form_and_round_trip() -> None:
    fields = {"MESSAGE": "two\nlines", "PRIORITY": "3", "EVENT": "ünïcode"}
    assert _decode(_encode(fields)) == fields


def test_a_record_too_large_for_a_datagram_goes_through_a_memfd(journald: FakeJournald) -> None:
    big = "x" * (4 << 20)  # far over any datagram limit
    sender = JournalSender(str(journald.path))
    try:
        assert sender.send({"MESSAGE": big, "PRIORITY": "6"})
        assert sender.send({"MESSAGE": "small", "PRIORITY": "6"})
    finally:
        sender.close()
    records = journald.drain()
    assert [len(r["MESSAGE"]) for r in records] == [len(big), 5]


def test_no_journal_socket_means_false_so_the_line_goes_to_stderr(tmp_path: Path) -> None:
    sender = JournalSender(str(tmp_path / "nobody-listens.sock"))
    try:
        assert sender.send({"MESSAGE": "m"}) is False
    finally:
        sender.close()


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not stderr_is_journal(stream, {})


# -- the daemon --------------------------------------------------------------------------------------------------


def _start(config: Path, err_path: Path, journald: FakeJournald, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "RETRAIN_UPLOADER_CONFIG")}
    with open(err_path, "wb") as err:
        st = os.fstat(err.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        env["RETRAIN_UPLOADER_JOURNAL_SOCKET"] = str(journald.path)
        return subprocess.Popen([*COMMAND, "run", "--config", str(config), *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env=env)


def _events(records: list[dict[str, str]]) -> list[str]:
    return [r.get("EVENT", "") for r in records]


@pytest.mark.slow
async def test_the_daemon_writes_native_journal_records_with_priorities_and_fields(
    tmp_path: Path, emulator: Emulator, journald: FakeJournald
) -> None:
    config = write_config(tmp_path, emulator.base_url)
    inbox = tmp_path / "inbox" / "alpha"
    err_path = tmp_path / "stderr"
    proc = _start(config, err_path, journald)
    try:
        await wait_for(lambda: "service.started" in _events(journald.drain()), what="service.started")
        drop(inbox, "good.csv", "id,x\n1,2\n")
        drop(inbox, "bad.csv", "id,x\n1,2,3\n")  # ragged: job.failed, an error

        def closed() -> int:
            return sum(1 for r in journald.drain() if r.get("EVENT") == "job.closed")

        await wait_for(lambda: closed() >= 2, what="two jobs closed")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 15)
    assert proc.returncode == 0
    records = journald.drain()
    assert all(r["SYSLOG_IDENTIFIER"] == "retrain-uploader" for r in records)
    for r in records:  # MESSAGE is the JSON line, and the fields agree with it
        message: dict[str, Any] = json.loads(r["MESSAGE"])
        assert r["EVENT"] == message["event"]
    [failed] = [r for r in records if r.get("EVENT") == "job.failed"]
    assert failed["PRIORITY"] == "3" and failed["MODEL"] == "alpha" and failed["JOB_ID"]
    good_job = next(r["JOB_ID"] for r in records if r.get("EVENT") == "upload.finished")
    story = [r["EVENT"] for r in records if r.get("JOB_ID") == good_job]
    assert story[0] == "job.queued" and "upload.started" in story and "upload.finished" in story
    finished = next(r for r in records if r.get("EVENT") == "upload.finished")
    assert finished["PRIORITY"] == "6" and finished["RETRAIN_JOB_ID"]
    assert err_path.read_bytes() == b""  # nothing went to the stream: every record took the native path


@pytest.mark.slow
async def test_a_config_error_at_start_is_a_journal_record_at_priority_err_and_exit_2(
    tmp_path: Path, journald: FakeJournald
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[api]\nbase_url = "ftp://nowhere"\n[[models]]\nname = "a"\ninbox = "in"\napi_key_env = "K"\n')
    proc = _start(config, tmp_path / "stderr", journald)
    assert await asyncio.to_thread(proc.wait, 15) == 2
    [record] = [r for r in journald.drain() if r.get("EVENT") == "config.invalid"]
    assert record["PRIORITY"] == "3"
    assert "api.base_url" in json.loads(record["MESSAGE"])["error"]


@pytest.mark.slow
async def test_without_a_journal_the_lines_go_to_stderr_as_json(tmp_path: Path, journald: FakeJournald) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[api]\nbase_url = "ftp://nowhere"\n[[models]]\nname = "a"\ninbox = "in"\napi_key_env = "K"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "RETRAIN_UPLOADER_CONFIG")}
    started = time.monotonic()
    done = await asyncio.to_thread(subprocess.run, [*COMMAND, "run", "--config", str(config)], capture_output=True,
                                   env=env, timeout=15, check=False)
    assert time.monotonic() - started < 15
    assert done.returncode == 2
    [line] = done.stderr.decode().splitlines()
    assert json.loads(line)["event"] == "config.invalid"
    assert journald.drain() == []
