"""Closing a job on a full disk: the error file of a file that was not taken is written as soon as there is room
again, not at the next start (a real 1 MiB tmpfs holds the inbox)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrain_uploader.ledger import State

from .conftest import fill_disk, wait_for


async def test_a_rejects_error_file_is_written_once_the_disk_has_room_again(
    start_daemon: Callable[..., Any], make_settings: Callable[..., Any], small_disk: Path, tmp_path: Path
) -> None:
    inbox = small_disk / "alpha"
    keys = tmp_path / "keys"
    settings = make_settings(
        models=[{"name": "alpha", "inbox": str(inbox), "api_key_file": str(keys / "alpha")}],
        retry={"max_delay_s": 0.3},
    )
    d = await start_daemon(settings)
    filler = fill_disk(small_disk)
    os.symlink("/etc/hostname", inbox / "link.csv")  # a symlink is never followed: rejected, moved to failed/

    def recorded() -> Any:
        jobs = [j for j in d.jobs() if j.kind == "reject"]
        return jobs and jobs[0]

    job = await wait_for(recorded, what="the reject recorded")
    assert job.state is State.FAILED
    error_file = inbox / "failed" / "link.csv.error.json"
    assert not error_file.exists()  # no room for it yet
    filler.unlink()
    await wait_for(error_file.exists, timeout=10, what="the error file once the disk has room again")
    assert json.loads(error_file.read_text())["job_id"] == job.id
    await wait_for(lambda: all(j.closed for j in d.jobs()), what="the job closed")
    assert [j.kind for j in d.jobs()] == ["reject"]  # one job, not one per scan
