"""The host's limits against the config: a real daemon under a real low RLIMIT_NOFILE takes every file of 100
models, and what does not fit is said once, with the setting that fixes it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from retrain_uploader.emulator import Emulator
from retrain_uploader.limits import Limits, fds_needed, plan

from . import _proc
from ._proc import DaemonProcess, LedgerView, write_config
from .conftest import drop

MODELS = 100


def test_a_config_that_fits_needs_nothing() -> None:
    result = plan(Limits(1024, 4096, 128, 8192), inboxes=300, workers=8, polls=8)
    assert result.raise_soft_to is None and result.event_slots is None and result.problems == ()


def test_a_low_soft_fd_limit_is_lifted_up_to_the_hard_one_and_a_low_hard_one_is_said_with_its_fix() -> None:
    needed = fds_needed(workers=8, polls=8)
    assert plan(Limits(32, 4096, 128, 8192), inboxes=1, workers=8, polls=8).raise_soft_to == needed
    low = plan(Limits(32, 50, 128, 8192), inboxes=1, workers=8, polls=8)
    assert low.raise_soft_to == 50
    assert [(event, fields["limit"], fields["needed"], fields["fix"]) for event, fields in low.problems] == [
        ("limits.fds_low", 50, needed, "LimitNOFILE=4096 in the unit (or ulimit -n), or fewer workers")
    ]


def test_inboxes_beyond_the_inotify_watches_are_polled_and_said_once() -> None:
    result = plan(Limits(1024, 4096, 128, 164), inboxes=300, workers=2, polls=2)
    assert result.event_slots == 100
    [(event, fields)] = result.problems
    assert event == "limits.inotify_watches_low"
    assert (fields["event_watched"], fields["polled"], fields["fix"]) == (
        100, 200, "sysctl -w fs.inotify.max_user_watches=8192"
    )
    # force_polling (NFS): no inotify watch is wanted, so there is nothing to say
    assert plan(Limits(1024, 4096, 128, 164), inboxes=300, workers=2, polls=2, force_polling=True).problems == ()


@pytest.fixture
async def many_keys_emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    async with Emulator(keys={f"key-m{i:03d}": i + 1 for i in range(MODELS)}) as emu:
        yield emu


def _limited(monkeypatch: pytest.MonkeyPatch, nofile: int) -> None:
    # The real daemon process, started under a real hard and soft RLIMIT_NOFILE (util-linux prlimit).
    monkeypatch.setattr(_proc, "COMMAND", ["prlimit", f"--nofile={nofile}:{nofile}", "--", *_proc.COMMAND])


def _open_fds(pid: int) -> list[str]:
    return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]


async def test_under_nofile_256_a_daemon_with_100_models_takes_every_dropped_file(
    tmp_path: Path, many_keys_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    _limited(monkeypatch, 256)
    keys = {f"m{i:03d}": f"key-m{i:03d}" for i in range(MODELS)}
    config = write_config(
        tmp_path, many_keys_emulator.base_url, keys=keys, watch={"settle_s": 0.1, "rescan_s": 30}
    )
    daemon = DaemonProcess(config, tmp_path)
    try:
        await daemon.start(timeout=30)
        for i, model in enumerate(keys):
            drop(tmp_path / "inbox" / model, f"f{i}.csv", f"a,b\n{i},{i}\n")
        # Well before the 30 s rescan: every inbox is event-watched by the one inotify instance.
        jobs = await LedgerView(daemon_ledger(tmp_path)).all_closed(MODELS, timeout=25, why=daemon.tail())
        fds = _open_fds(daemon.pid)
    finally:
        await daemon.close()
    assert sorted(j["model"] for j in jobs) == sorted(keys)
    assert fds.count("anon_inode:inotify") == 1
    assert len(fds) < 100
    assert not daemon.logged("limits.fds_low") and not daemon.logged("inbox.watch_failed")


async def test_a_hard_fd_limit_below_the_need_is_said_once_with_the_fix_and_files_are_still_taken(
    tmp_path: Path, many_keys_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = 20
    needed = fds_needed(workers=workers, polls=8)
    _limited(monkeypatch, needed - 20)
    config = write_config(
        tmp_path, many_keys_emulator.base_url, keys={"m000": "key-m000"}, pool={"workers": workers},
        watch={"settle_s": 0.1, "rescan_s": 30},
    )
    daemon = DaemonProcess(config, tmp_path)
    try:
        await daemon.start(timeout=30)
        drop(tmp_path / "inbox" / "m000", "a.csv", "a,b\n1,2\n")
        await LedgerView(daemon_ledger(tmp_path)).all_closed(1, timeout=15, why=daemon.tail())
    finally:
        await daemon.close()
    said = daemon.logged("limits.fds_low")
    assert [(e["limit"], e["needed"], e["fix"]) for e in said] == [
        (needed - 20, needed, "LimitNOFILE=4096 in the unit (or ulimit -n), or fewer workers")
    ]


def daemon_ledger(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.sqlite3"
