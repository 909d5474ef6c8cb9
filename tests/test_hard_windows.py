"""The exactly-once promises attacked across modules, as an adversary would: archives on another filesystem, rewrites
that keep size and mtime, escaped signatures, library log lines, a model name given to another inbox, a remote job
not listed yet. Each test failed on the code before its fix. Real emulator, real processes, files and SQLite."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from retrain_uploader.emulator import Emulator

from ._proc import LedgerView, write_config
from .conftest import drop, wait_for

CSV = "id,age,plan\n1,34,basic\n2,51,premium\n"


def sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


async def test_done_symlinked_to_another_filesystem_keeps_the_file_in_done(
    start_daemon, emulator: Emulator, small_disk: Path
) -> None:
    """Promise 10: done/ a symlink to another filesystem works (once, the closer compared the identity (dev, inode,
    ...) of the *copy* in done/ with the inbox file's, always different across filesystems, and moved the uploaded
    file back into the inbox to be taken again as a new job)."""
    d0 = await start_daemon()
    inbox = d0.inbox()
    await d0.stop()
    archive = small_disk / "done"
    archive.mkdir()
    (inbox / "done").rmdir()
    (inbox / "done").symlink_to(archive)
    d = await start_daemon()
    drop(inbox, "a.csv", CSV)
    await d.closed_jobs(1)
    await asyncio.sleep(1.5)  # three rescans: time for a file moved back to be taken again
    jobs = d.jobs()
    assert [j.id for j in jobs] == [jobs[0].id], f"a second job for the same drop: {[(j.id, j.state) for j in jobs]}"
    assert (archive / "a.csv").read_text() == CSV
    assert not (inbox / "a.csv").exists(), "the uploaded file is back in the inbox"
    assert emulator.upload_count_by_sha()[sha(CSV)] == 1


async def test_failed_symlinked_to_another_filesystem_makes_one_failed_job(
    start_daemon, emulator: Emulator, small_disk: Path
) -> None:
    """Promise 10, failed/ side: a bad file moved into failed/ on another filesystem is moved back the same way and
    fails again, job after job (and an error file each time)."""
    d0 = await start_daemon()
    inbox = d0.inbox()
    await d0.stop()
    archive = small_disk / "failed"
    archive.mkdir()
    (inbox / "failed").rmdir()
    (inbox / "failed").symlink_to(archive)
    d = await start_daemon()
    drop(inbox, "bad.csv", "id,age\n1,2,3\n")  # a ragged row: fails its check, never reaches the API
    await d.closed_jobs(1)
    await asyncio.sleep(1.5)
    jobs = d.jobs()
    assert len(jobs) == 1, f"{len(jobs)} failed jobs for one bad file"
    assert (archive / "bad.csv").exists() and not (inbox / "bad.csv").exists()
    assert not emulator.uploads


async def test_a_same_size_rewrite_in_place_with_its_mtime_kept_is_not_moved_to_done_unsent(
    start_daemon, emulator: Emulator
) -> None:
    """Promise 1: a file re-dropped under the same name while the old one uploads is never moved to done/ unsent.
    The identity is (dev, inode, size, mtime) without ctime, so a rewrite in place that keeps size and mtime (``cp -p``
    / ``rsync --inplace -t`` from a file of the same size and time) after the PUT is taken for the checked file."""
    d = await start_daemon()
    inbox = d.inbox()
    emulator.inject("put", "drop", after_body=True)  # the PUT arrives, its answer is lost
    emulator.inject("status", "slow", delay_s=0)  # the baseline check before the PUT is answered
    emulator.inject("status", "http_status", status=503, times=1000)  # ... then the status check keeps failing
    path = drop(inbox, "a.csv", CSV)
    await wait_for(lambda: emulator.uploads, 10, "the PUT to arrive")
    await wait_for(lambda: any(j.outcome_unknown_since for j in d.jobs()), 10, "the outcome to be unknown")
    new = CSV.replace("basic", "BASIC")
    assert len(new) == len(CSV)
    st = os.stat(path)
    with open(path, "r+b") as f:  # in place: same inode
        f.write(new.encode())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the copy tool keeps the source's time
    emulator.clear_faults()
    await d.closed_jobs(1)
    await asyncio.sleep(1.0)
    received = {u.sha256 for u in emulator.uploads}
    assert sha(CSV) in received
    done = inbox / "done" / "a.csv"
    assert not done.exists() or sha(done.read_bytes()) in received, "done/ holds bytes that were never sent"



SIGNATURE = "5ecre7519a7ure0f7he0bjec7"


@pytest.mark.slow
async def test_a_json_escaped_presigned_url_in_an_odd_answer_never_reaches_stderr_or_the_ledger(
    tmp_path: Path, emulator: Emulator, daemons
) -> None:
    """Promises 13/14: "JSON-escaped URLs" are scrubbed. A cut-off upload_url answer (not JSON, so its excerpt is
    recorded) whose URL is written the way many JSON encoders write it (``https:\\/\\/``) keeps its signature."""
    body = (
        '{"retrain_job_id": "x", "upload_url": "https:\\/\\/bucket.s3.amazonaws.com\\/k.csv?X-Amz-Credential=AKIA'
        f'%2F20261202&X-Amz-Signature={SIGNATURE}'
    )
    emulator.inject("upload_url", "http_status", status=200, body=body)
    config = write_config(tmp_path, emulator.base_url)
    daemon = await daemons(config).start()
    drop(tmp_path / "inbox" / "alpha", "a.csv", CSV)
    ledger = LedgerView(tmp_path / "state" / "ledger.sqlite3")
    await ledger.all_closed(1)
    code, _ = await daemon.terminate()
    assert code == 0
    assert emulator.upload_count_by_sha()[sha(CSV)] == 1
    assert daemon.logged("upload.retry_scheduled"), daemon.tail()
    leaks = [where for where, text in (
        ("stderr", daemon.text()),
        ("ledger", (tmp_path / "state" / "ledger.sqlite3").read_bytes().decode("utf-8", "replace")),
        ("ledger events", repr(ledger.events())),
    ) if SIGNATURE in text]
    assert not leaks, f"the presigned URL's signature is in: {leaks}"


async def test_a_model_name_given_to_another_inbox_and_key_does_not_make_false_duplicates(
    start_daemon, make_settings, emulator: Emulator, tmp_path: Path
) -> None:
    """Promise 5 (duplicates survive renames) taken the other way: the duplicate query matches ``model = ? OR
    inbox = ?``, so after a config change that gives the name ``alpha`` to another inbox and another key (another
    remote model, which never received the content), the content is called a duplicate and never uploaded there."""
    keys = tmp_path / "keys"
    a, b = tmp_path / "inbox" / "alpha", tmp_path / "inbox" / "beta"
    d1 = await start_daemon(
        make_settings(models=[{"name": "alpha", "inbox": str(a), "api_key_file": str(keys / "alpha")}])
    )
    drop(a, "x.csv", CSV)
    await d1.closed_jobs(1)
    await d1.stop()
    # The old model is retired; the name now means inbox b with key-beta-0002 (remote model 2).
    d2 = await start_daemon(
        make_settings(models=[{"name": "alpha", "inbox": str(b), "api_key_file": str(keys / "beta")}])
    )
    drop(b, "x.csv", CSV)
    jobs = await d2.closed_jobs(2)
    models_sent = sorted(emulator.jobs[u.job_id].model_id for u in emulator.uploads)
    assert models_sent == [1, 2], f"remote model 2 never got the content: {[(j.id, j.state) for j in jobs]}"


def test_retry_after_with_leading_zeros_is_its_number_of_seconds() -> None:
    """Promise 9: delay-seconds is 1*DIGIT, so ``0000000000001`` is one second. The length guard counts the zeros
    and turns it into 10**12 s (the policy then waits its one-hour cap instead of one second)."""
    from datetime import UTC, datetime

    from retrain_uploader.retry_after import parse_retry_after

    now = datetime(2026, 12, 2, tzinfo=UTC)
    assert parse_retry_after("0000000000001", now) == 1.0
    assert parse_retry_after("0000000000000000000000005.5", now) == 5.5


async def test_a_new_remote_job_not_listed_yet_by_the_status_check_does_not_fail_the_file(
    start_daemon, emulator: Emulator
) -> None:
    """outcome.decide() grants "Not found retrain job." a wait ("a new job may not be listed yet") after a PUT, but
    the baseline check before the PUT has no such grace: the same answer there fails the job at once (other 4xx) and
    a good file lands in failed/ though nothing was sent and the remote job exists."""
    import json

    gone = json.dumps({"code": 4001000204, "error": "PREDA_EXTERNAL_BAD_REQUEST", "message": "Not found retrain job."})
    emulator.inject("status", "http_status", status=400, body=gone, content_type="application/json", times=2)
    d = await start_daemon()
    drop(d.inbox(), "a.csv", CSV)
    [job] = await d.closed_jobs(1)
    assert job.state.value != "failed", f"{job.state}: {job.error}"
    assert emulator.upload_count_by_sha()[sha(CSV)] == 1


@pytest.mark.slow
async def test_every_stderr_line_is_json_even_when_a_library_logs(tmp_path: Path, daemons) -> None:
    """Promise 14: every stderr line is JSON (and scrubbed). Libraries log through stdlib logging, which the CLI
    sets up with a plain-text format: one malformed request to the metrics port prints a multi-line traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path, "http://127.0.0.1:9", metrics={"enabled": True, "port": port})
    daemon = await daemons(config).start()

    def poke() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /metrics?X-Amz-Signature=" + SIGNATURE.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: -5\r\n\r\n")
            return conn.recv(100)

    assert (await asyncio.to_thread(poke)).startswith(b"HTTP/1.")
    code, _ = await daemon.terminate()
    assert code == 0
    import json

    bad = []
    for line in daemon.text().splitlines():
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    assert not bad, "\n".join(bad[:12])


async def test_a_new_file_dropped_under_the_same_name_during_an_unknown_outcome_is_uploaded(
    start_daemon, emulator: Emulator
) -> None:
    """Promise 1 (held? the re-drop is a new inode): it must stay in the inbox and be uploaded as a job of its own."""
    d = await start_daemon()
    inbox = d.inbox()
    emulator.inject("put", "drop", after_body=True)
    emulator.inject("status", "slow", delay_s=0)
    emulator.inject("status", "http_status", status=503, times=1000)
    drop(inbox, "a.csv", CSV)
    await wait_for(lambda: emulator.uploads, 10, "the PUT to arrive")
    await wait_for(lambda: any(j.outcome_unknown_since for j in d.jobs()), 10, "the outcome to be unknown")
    new = CSV + "3,40,basic\n"
    drop(inbox, "a.csv", new)  # a new inode under the same name
    await asyncio.sleep(0.5)  # longer than settle_s: the watcher has seen it
    emulator.clear_faults()
    await wait_for(lambda: emulator.upload_count_by_sha()[sha(new)] == 1, 10, "the new file to be uploaded")
    await d.closed_jobs(2)
    assert emulator.upload_count_by_sha()[sha(CSV)] == 1
    # The old file was unlinked by the user's rename over it; only the new one is left to archive.
    assert (inbox / "done" / "a.csv").read_text() == new
    assert not (inbox / "a.csv").exists()


@pytest.mark.slow
async def test_kill_9_while_copying_into_an_archive_on_another_filesystem_finishes_the_move_once(
    tmp_path: Path, emulator: Emulator, small_disk: Path, daemons
) -> None:
    """The move into a done/ that links to another filesystem is a copy (seconds for a big file): SIGKILL in the
    middle of it, restart, and the file ends in the archive once, whole, with no partial copy and nothing in the
    inbox; it was uploaded once."""
    import subprocess

    await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    config = write_config(tmp_path, emulator.base_url)
    inbox = tmp_path / "inbox" / "alpha"
    archive = small_disk / "archive"
    archive.mkdir()
    inbox.mkdir(parents=True)
    (inbox / "done").symlink_to(archive)
    block = b"".join(b"%d,%d,%d\n" % (i, i * 7, i % 13) for i in range(60_000))  # ~1 MB
    data = b"a,b,c\n" + block * 200
    drop(inbox, "big.csv", data)
    daemon = await daemons(config).start()
    partial = lambda: [p for p in archive.iterdir() if p.name.endswith(".moving")]  # noqa: E731
    await wait_for(partial, 60, "a copy into the archive under way")
    await daemon.kill()
    assert emulator.upload_count_by_sha()[sha(data)] == 1
    await daemon.start()
    ledger = LedgerView(tmp_path / "state" / "ledger.sqlite3")
    [job] = await ledger.all_closed(1, timeout=60)
    assert job["state"] in {"uploaded", "retraining", "finished"}
    assert not (inbox / "big.csv").exists()
    assert partial() == []
    archived = [p for p in archive.iterdir() if p.name.endswith(".csv")]
    assert [p.name for p in archived] == ["big.csv"]
    assert sha(archived[0].read_bytes()) == sha(data)
    assert emulator.upload_count_by_sha()[sha(data)] == 1
