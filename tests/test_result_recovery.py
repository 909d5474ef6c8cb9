"""A retraining's result is downloaded once, whatever instant a kill -9 picks (real daemon processes, the emulator).

The result used to get its name in ``done/`` before the ledger recorded it: a kill in between left an unrecorded
``a.result.zip``, and the next start downloaded it again as ``a.job1.result.zip`` (two copies, found by review). Now
it is recorded first and then renamed from its hidden part, and the next start gives a recorded part its name. A
``sitecustomize`` in the daemon makes each instant exact: it SIGKILLs the process just before, or right after, the
result's rename to its name (the syscall made by the hook itself, nothing after it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from retrain_uploader.emulator import Emulator

from ._proc import DaemonProcess, LedgerView, write_config
from .conftest import drop, sitecustomize_env, wait_for

pytestmark = pytest.mark.slow

_SITECUSTOMIZE = '''
import os, signal, sys
_busy = []
def _hook(event, args):
    # The result's move to its name: os.link (then an unlink) or os.rename, to a name ending in .result.zip.
    if _busy or event not in ("os.link", "os.rename") or not os.fsdecode(args[1]).endswith(".result.zip"):
        return
    _busy.append(1)
    if os.environ["RESULT_KILL"] == "after-name":
        os.rename(args[0], args[1])  # the move made here, whole; then the process dies before anything else
    os.kill(os.getpid(), signal.SIGKILL)
def _hook_inside(event, args):
    # Inside the move: its hard link made, the part not unlinked yet (both names on one file).
    if event == "os.remove" and ".result.zip.job" in os.fsdecode(args[0]):
        os.kill(os.getpid(), signal.SIGKILL)
if os.environ.get("RESULT_KILL") == "inside-rename":
    sys.addaudithook(_hook_inside)
elif os.environ.get("RESULT_KILL"):
    sys.addaudithook(_hook)
'''


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def downloads(emulator: Emulator) -> int:
    """Result downloads the emulator served."""
    return len([r for r in emulator.requests if r.endpoint == "result"])


def _in_place(ledger: LedgerView, done: Path) -> bool:
    """The result recorded and at its name (it is recorded just before it is renamed there from its part)."""
    jobs = ledger.jobs()
    return bool(jobs and jobs[0]["result_path"] and (done / "a.result.zip").exists())


async def stopped_with_one_result(daemon: DaemonProcess, ledger: LedgerView, done: Path, emulator: Emulator) -> None:
    """Stopped cleanly, with one result recorded at done/a.result.zip, there, downloaded once (not a second copy),
    nothing beside it (no part, no a.job1.result.zip)."""
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()
    [job] = ledger.jobs()
    assert job["result_path"] == "done/a.result.zip", job
    assert names(done) == ["a.csv", "a.result.zip"]
    assert downloads(emulator) == 1


async def _killed_at(
    where: str, tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> tuple[DaemonProcess, LedgerView, Path]:
    """A daemon that uploads a.csv, follows its retraining, downloads its result and kills itself ``where``."""
    config = write_config(tmp_path, emulator.base_url, status={"poll_s": 0.2, "max_poll_s": 0.2})
    daemon = daemons(config)
    await daemon.start(env={"RESULT_KILL": where, **sitecustomize_env(tmp_path / "site", _SITECUSTOMIZE)})
    drop(tmp_path / "inbox" / "alpha", "a.csv", "x,y,label\n1,2,a\n3,4,b\n")
    await daemon.wait(30)  # it kills itself
    assert daemon.returncode == -9, daemon.tail()
    return daemon, LedgerView(tmp_path / "state" / "ledger.sqlite3"), tmp_path / "inbox" / "alpha" / "done"


async def _restarted(daemon: DaemonProcess, ledger: LedgerView, done: Path, emulator: Emulator) -> None:
    """The next start places the result (or finds it placed): see :func:`stopped_with_one_result`."""
    await daemon.start()  # no hook
    await wait_for(lambda: _in_place(ledger, done), 20, "the result in place")
    await stopped_with_one_result(daemon, ledger, done, emulator)


async def test_a_kill_9_right_after_the_result_gets_its_name_downloads_it_once(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    daemon, ledger, done = await _killed_at("after-name", tmp_path, emulator, daemons)
    assert ledger.jobs()[0]["result_path"] == "done/a.result.zip"  # recorded before it got its name
    assert (done / "a.result.zip").exists()
    await _restarted(daemon, ledger, done, emulator)


async def test_a_kill_9_between_the_record_and_the_name_gives_it_its_name_at_the_next_start(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    daemon, ledger, done = await _killed_at("before-name", tmp_path, emulator, daemons)
    assert ledger.jobs()[0]["result_path"] == "done/a.result.zip"
    assert names(done) == [".a.result.zip.job1.part", "a.csv"]
    await _restarted(daemon, ledger, done, emulator)
    [recovered] = daemon.logged("retrain.result_downloaded")
    assert recovered["recovered"] is True and recovered["path"] == "done/a.result.zip", recovered


async def test_a_kill_9_inside_the_move_to_its_name_keeps_one_result(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    """The move is a hard link and an unlink: a kill between them leaves the part and the name on one file, recorded.
    The next start drops the part, keeps the record (it once undid it, and the result was fetched again)."""
    daemon, ledger, done = await _killed_at("inside-rename", tmp_path, emulator, daemons)
    assert names(done) == [".a.result.zip.job1.part", "a.csv", "a.result.zip"]
    await _restarted(daemon, ledger, done, emulator)
