"""Attacks on issue 9 that HELD on the reviewed code (main at fdbb361): kept as regression tests."""

from __future__ import annotations

import asyncio
import hashlib

from retrain_uploader.emulator import Emulator

from .conftest import drop, wait_for

CSV = "id,age,plan\n1,34,basic\n2,51,premium\n"


def sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


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
