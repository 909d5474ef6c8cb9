"""A retraining's result is downloaded once, whatever instant a kill -9 picks (real daemon processes, the emulator).

The result lands in ``done/`` under its name before the ledger records it: a kill in between used to leave an
unrecorded ``a.result.zip``, and the next start downloaded the result again as ``a.job1.result.zip`` (two copies,
found by review). A ``sitecustomize`` in the daemon makes the instant exact: right after the result got its name (the
syscall done, nothing after it), it SIGKILLs itself."""

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
    # Right after the result gets its name in done/ (link or rename: the syscall is made here, then the process dies).
    if _busy or event not in ("os.link", "os.rename") or not os.fsdecode(args[1]).endswith(".result.zip"):
        return
    _busy.append(1)
    (os.link if event == "os.link" else os.rename)(args[0], args[1])
    os.kill(os.getpid(), signal.SIGKILL)
def _hook_after_record(event, args):
    # Just before the part is removed: the result is recorded (its commit made), its hidden part not removed yet.
    if event == "os.remove" and ".result.zip.job" in os.fsdecode(args[0]):
        os.kill(os.getpid(), signal.SIGKILL)
if os.environ.get("RESULT_KILL") == "after-name":
    sys.addaudithook(_hook)
if os.environ.get("RESULT_KILL") == "after-record":
    sys.addaudithook(_hook_after_record)
'''


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


async def test_a_kill_9_after_the_result_lands_and_before_its_record_downloads_it_once(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    daemon, ledger, done = await _killed_at("after-name", tmp_path, emulator, daemons)
    [job] = ledger.jobs()
    assert job["result_path"] is None, job  # killed before the record
    assert (done / "a.result.zip").exists()

    await daemon.start()  # no hook
    await wait_for(lambda: ledger.jobs()[0]["result_path"], 20, "the result recorded")
    [job] = ledger.jobs()
    assert job["result_path"] == "done/a.result.zip", job
    downloads = [r for r in emulator.requests if r.endpoint == "result"]
    assert len(downloads) == 1, downloads  # not a second copy
    assert sorted(p.name for p in done.iterdir()) == ["a.csv", "a.result.zip"]  # no part file, no a.job1.result.zip
    assert [e["detail"].get("recovered") for e in ledger.events(job["id"], "result_downloaded")] == [True]
    assert daemon.logged("retrain.result_downloaded")[0]["recovered"] is True
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()


async def test_a_kill_9_after_the_record_leaves_no_hidden_part_behind(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    """The part is a second name of the result until it is removed: a kill just before that leaves it, and the next
    start removes it (the result recorded and kept, nothing downloaded again)."""
    daemon, ledger, done = await _killed_at("after-record", tmp_path, emulator, daemons)
    assert ledger.jobs()[0]["result_path"] == "done/a.result.zip"
    [part] = [p for p in done.iterdir() if p.name.startswith(".")]
    assert part.name == ".a.result.zip.job1.part"

    await daemon.start()
    assert sorted(p.name for p in done.iterdir()) == ["a.csv", "a.result.zip"]
    assert (done / "a.result.zip").stat().st_nlink == 1
    assert len([r for r in emulator.requests if r.endpoint == "result"]) == 1
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()
