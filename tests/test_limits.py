"""The host's limits against the config: a real daemon under a real low RLIMIT_NOFILE takes every file of 100
models, and what does not fit is said once, with the setting that fixes it."""

from __future__ import annotations

import os
import subprocess
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


def _no_inotify_instances() -> bool:
    """Whether this machine lets a process run in a user namespace of its own whose inotify instance limit is 0 (a
    limit of that namespace only: the rest of the machine is not touched)."""
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "sh", "-c",
             "echo 0 > /proc/sys/user/max_inotify_instances && cat /proc/sys/user/max_inotify_instances"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and probe.stdout.strip() == "0"


@pytest.mark.skipif(not _no_inotify_instances(), reason="needs unshare --user and a namespaced inotify limit")
async def test_no_inotify_instance_to_be_had_is_said_once_and_every_inbox_is_polled(
    tmp_path: Path, many_keys_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real daemon in a user namespace whose fs.inotify instance limit is 0: inotify_init fails with EMFILE, as on
    # a host where other programs of the service user took all 128. Exhausting the real limit would break them.
    monkeypatch.setattr(_proc, "COMMAND", [
        "unshare", "--user", "--map-root-user", "sh", "-c",
        'echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"', "sh", *_proc.COMMAND,
    ])
    keys = {f"m{i:03d}": f"key-m{i:03d}" for i in range(3)}
    config = write_config(tmp_path, many_keys_emulator.base_url, keys=keys,
                          watch={"settle_s": 0.1, "rescan_s": 60, "poll_delay_ms": 200})
    daemon = DaemonProcess(config, tmp_path)
    try:
        await daemon.start(timeout=30)
        for i, model in enumerate(keys):
            drop(tmp_path / "inbox" / model, f"f{i}.csv", f"a,b\n{i},{i}\n")
        # Well before the 60 s rescan: polled every poll_delay_ms.
        jobs = await LedgerView(daemon_ledger(tmp_path)).all_closed(len(keys), timeout=20, why=daemon.tail())
        fds = _open_fds(daemon.pid)
    finally:
        await daemon.close()
    assert sorted(j["model"] for j in jobs) == sorted(keys)
    assert "anon_inode:inotify" not in fds
    said = daemon.logged("watch.limit_reached")
    assert len(said) == 1, said
    assert said[0]["inboxes"] == len(keys) and "max_user_instances" in said[0]["fix"]
