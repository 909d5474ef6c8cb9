"""What a small file costs the ledger: its commits, and the state each one leaves on disk — the states a kill -9
could find. Real service in-process, real emulator, real SQLite; the daemon's connection is traced, the states are
read through a second connection."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from retrain_uploader.emulator import Emulator

from .conftest import KEYS, drop, wait_for

CSV = "id,age,plan\n1,34,basic\n2,51,premium\n"


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    """The conftest's emulator, with a retraining that lasts: the job stays `retraining` after its first check."""
    store = tmp_path / "emulator-store"
    store.mkdir()
    async with Emulator(keys=KEYS, store_dir=store, retrain_s=3600) as emu:
        yield emu


def _state(db: sqlite3.Connection) -> tuple[Any, ...] | None:
    """The committed facts a restart acts on, of the one job: state, put_started, a URL's remote job recorded, a
    baseline recorded, content hashed, its moves planned, closed; and whether the model's last success is recorded."""
    row = db.execute(
        "SELECT state, put_started, retrain_job_id IS NOT NULL, status_before_put IS NOT NULL,"
        " content_sha256 IS NOT NULL, moved_to, closed FROM jobs"
    ).fetchone()
    if row is None:
        return None
    success = db.execute("SELECT last_success_at IS NOT NULL FROM models WHERE name = 'alpha'").fetchone()
    state, put_started, url, baseline, hashed, moved_to, closed = row
    return (state, put_started, url, baseline, hashed, bool(json.loads(moved_to)), closed, bool(success and success[0]))


async def test_a_small_file_costs_seven_commits_and_each_leaves_a_state_a_restart_resumes_from(
    start_daemon: Any, emulator: Emulator
) -> None:
    """Was 12 commits: packaging, packaged and the claim were three; `uploading` and put_started two; the upload, the
    model's last success and the move plan three. Merged, with put_started still committed before the PUT and the
    move plan before the renames, and no state left behind that a restart does not handle."""
    d = await start_daemon()
    path: Path = d.settings.ledger.path
    view = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    seen: list[tuple[Any, ...] | None] = []
    commits = 0
    flushed: list[bool] = []  # per commit: made with synchronous=FULL (fsync'd), or NORMAL (written, not flushed)
    full = True

    def trace(sql: str) -> None:
        nonlocal commits, full
        if sql.startswith("BEGIN"):
            seen.append(_state(view))  # what the previous commit left: the daemon's next write has not begun
        elif sql.startswith("PRAGMA synchronous="):
            full = sql == "PRAGMA synchronous=FULL"
        elif sql == "COMMIT":
            commits += 1
            flushed.append(full)

    d.service.ledger._db.set_trace_callback(trace)  # the daemon's one connection (the test looks inside on purpose)
    try:
        drop(d.inbox(), "a.csv", CSV)

        def retraining() -> bool:
            state = _state(view)
            return state is not None and state[0] == "retraining" and bool(state[6])

        await wait_for(retraining, 10, "the job closed and its retraining seen")
        seen.append(_state(view))
    finally:
        d.service.ledger._db.set_trace_callback(None)
        await d.stop()
        view.close()
    after_each_commit = [s for s in seen if s is not None]
    #        state         put url  base  hash  plan  closed success
    assert after_each_commit == [
        ("queued",      0, 0, 0, 0, 0, 0, 0),  # taken: a restart packages it
        ("requesting",  0, 0, 0, 1, 0, 0, 0),  # packaged and claimed: a restart asks for a URL
        ("requesting",  0, 1, 0, 1, 0, 0, 0),  # the URL's remote job: a restart asks for a new URL, abandoning it
        ("uploading",   1, 1, 1, 1, 0, 0, 0),  # baseline + put_started, before the first byte: settled by status
        ("uploaded",    0, 1, 1, 1, 1, 0, 1),  # uploaded, success, moves planned: a restart closes with this plan
        ("uploaded",    0, 1, 1, 1, 1, 1, 1),  # closed, after the renames
        ("retraining",  0, 1, 1, 1, 1, 1, 1),  # the tracker's first status answer
    ], after_each_commit
    assert commits == 7
    # Flushed: put_started before the first byte, and the move plan before the renames (a restart could not do
    # without either). The others a restart does again if a power cut loses them; a flushed commit flushes them too.
    assert flushed == [False, False, False, True, True, False, False]
    assert len(emulator.uploads) == 1
    assert (d.inbox() / "done" / "a.csv").read_text() == CSV
