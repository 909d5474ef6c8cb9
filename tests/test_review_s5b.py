"""Adversarial review s5b of the last result-download changes (real daemon processes, the emulator, real files).

Attacked: a result recorded first, then renamed from ``done/.NAME.result.zip.jobN.part`` (``tracker._download``,
``mover.rename_no_replace``: a hard link then an unlink), the record undone when the rename fails, and
``Service._recover_results`` / ``_place_recorded`` at start. A ``sitecustomize`` audit hook in the daemon makes each
instant exact (a SIGKILL, or a failing syscall where a real filesystem would fail it).

Defects found and fixed (each test failed before its fix):
``test_a_kill_9_between_the_link_and_the_unlink_of_the_result_downloads_it_once`` and
``test_a_failed_unlink_of_the_part_after_the_result_got_its_name_downloads_it_once`` (the result had its name, the
record was undone and it was fetched again: now a part that is already the result's second name is only dropped),
``test_a_recorded_part_of_a_job_from_before_schema_3_gets_its_name_at_the_next_start`` (a job with no recorded inbox
was refused) and ``test_a_start_where_done_refuses_writes_with_a_recorded_part_keeps_running`` (every start exited:
now the part and its record are kept, with a warning, and placed at a later start).

Held (regression tests): a user file at the result's name between plan and rename (in the tracker, and at start) is
kept and the result lands at ``NAME.jobN.result.zip``; ``[ledger] keep_days`` at start does not prune a job whose
result is recorded but still at its part (recovery runs in ``_start_model``, before retention's first pass;
``done_days`` skips hidden names); ``_held_names`` lets the real name go when the restarted reject closes (a later
drop of the same bytes is a job of its own). The ``switch`` CLI and auto-switch never look at the result file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from retrain_uploader.emulator import Emulator

from ._proc import DaemonProcess, LedgerView, write_config
from .conftest import drop, sitecustomize_env, wait_for
from .test_result_recovery import downloads, names, stopped_with_one_result
from .test_review_odd import (  # the read-only rig: its fixtures, used below
    Rig,
    give_to_nobody,
    reject_kept_open_across_a_restart,
    rig,  # noqa: F401
    table,
    teardown_daemons,  # noqa: F401
    unprivileged,  # noqa: F401
)

pytestmark = pytest.mark.slow

CSV = "x,y,label\n1,2,a\n3,4,b\n"

# RESULT_HOOK:
#   kill-before-unlink  the result's part linked to its name, then SIGKILL before the part's unlink (the middle of
#                       mover.rename_no_replace: a kill -9 can land there)
#   kill-before-name    SIGKILL just before the link to the name (a recorded part, no name)
#   user-takes-name     a user file written at the result's name just before the link (plan -> rename window)
#   unlink-fails-once   the part's first unlink (after the link gave it its name) fails with EIO
#   erofs               every link/rename/remove in a done/ folder fails with EROFS (done/ on a read-only mount)
_SITECUSTOMIZE = r"""
import errno, os, re, signal, sys
_PART = re.compile(r".*/done/\..+\.result\.zip\.job[0-9]+\.part$")
_linked = []
def _hook(event, args):
    mode = os.environ.get("RESULT_HOOK")
    if event not in ("os.link", "os.rename", "os.remove"):
        return
    src = os.fsdecode(args[0])
    dst = os.fsdecode(args[1]) if event != "os.remove" else ""
    if mode == "erofs":
        if "/done/" in src and _PART.match(src):
            raise OSError(errno.EROFS, "Read-only file system", src)
        return
    if event == "os.link" and _PART.match(src) and dst.endswith(".result.zip"):
        if mode == "kill-before-name":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "user-takes-name" and not _linked:
            _linked.append(1)
            with open(dst, "x") as f:
                f.write("the user's own file\n")
        if mode == "kill-before-unlink":
            _linked.append(1)
    elif event == "os.remove" and _PART.match(src) and _linked and mode == "kill-before-unlink":
        os.kill(os.getpid(), signal.SIGKILL)
    elif event == "os.remove" and _PART.match(src) and mode == "unlink-fails-once" and not _linked:
        _linked.append(1)
        raise OSError(errno.EIO, "Input/output error", src)
if os.environ.get("RESULT_HOOK"):
    sys.addaudithook(_hook)
"""


def _hooked(tmp_path: Path, mode: str) -> dict[str, str]:
    return {"RESULT_HOOK": mode, **sitecustomize_env(tmp_path / "site", _SITECUSTOMIZE)}


async def _killed(
    mode: str, tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> tuple[DaemonProcess, LedgerView, Path]:
    config = write_config(tmp_path, emulator.base_url, status={"poll_s": 0.2, "max_poll_s": 0.2})
    daemon = daemons(config)
    await daemon.start(env=_hooked(tmp_path, mode))
    drop(tmp_path / "inbox" / "alpha", "a.csv", CSV)
    await daemon.wait(30)  # it kills itself
    assert daemon.returncode == -9, daemon.tail()
    return daemon, LedgerView(tmp_path / "state" / "ledger.sqlite3"), tmp_path / "inbox" / "alpha" / "done"


async def test_a_kill_9_between_the_link_and_the_unlink_of_the_result_downloads_it_once(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    daemon, ledger, done = await _killed("kill-before-unlink", tmp_path, emulator, daemons)
    assert ledger.jobs()[0]["result_path"] == "done/a.result.zip"
    assert (done / "a.result.zip").exists()  # the link was made
    await daemon.start()  # no hook
    await wait_for(lambda: not [p for p in done.iterdir() if p.name.endswith(".part")], 10, "the part handled")
    # Either the result is kept as recorded, or (the defect) a second download comes: wait for one of the two.
    await wait_for(
        lambda: (
            downloads(emulator) > 1
            or (ledger.jobs()[0]["result_path"] == "done/a.result.zip" and daemon.logged("retrain.result_downloaded"))
        ),
        20,
        "the result recorded again or downloaded again",
    )
    await wait_for(lambda: ledger.jobs()[0]["result_path"], 20, "a result recorded")
    await stopped_with_one_result(daemon, ledger, done, emulator)


async def test_a_start_where_done_refuses_writes_with_a_recorded_part_keeps_running(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    daemon, ledger, done = await _killed("kill-before-name", tmp_path, emulator, daemons)
    assert ledger.jobs()[0]["result_path"] == "done/a.result.zip"
    assert len([p for p in done.iterdir() if p.name.endswith(".part")]) == 1  # recorded, not yet at its name
    await daemon.start(ready=False, env=_hooked(tmp_path, "erofs"))
    await wait_for(lambda: not daemon.running or daemon.logged("service.started"), 20, "the start or an exit")
    assert daemon.running, f"exited {daemon.returncode} at start:\n{daemon.tail()}"
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()
    # Kept, part and record, while done/ refused writes; placed at the next start that can write there.
    assert ledger.jobs()[0]["result_path"] == "done/a.result.zip"
    assert len([p for p in done.iterdir() if p.name.endswith(".part")]) == 1
    await daemon.start()
    assert names(done) == ["a.csv", "a.result.zip"]
    assert downloads(emulator) == 1
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()


async def test_a_kill_9_before_the_result_gets_its_name_with_keep_days_past_places_it_once(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    """Retention at start must not prune a job whose result is recorded but still at its part (recovery runs
    before retention's first pass): the part gets its name, no second download, no orphan."""
    daemon, ledger, done = await _killed("kill-before-name", tmp_path, emulator, daemons)
    [job] = ledger.jobs()
    assert job["result_path"] == "done/a.result.zip" and job["state"] == "finished", job
    config = write_config(
        tmp_path,
        emulator.base_url,
        status={"poll_s": 0.2, "max_poll_s": 0.2},
        ledger={"path": tmp_path / "state" / "ledger.sqlite3", "keep_days": 0.00001},
        retention={"interval_s": 0.2},
    )
    assert config == daemon.config
    stamp = time.time()  # the job was last changed before now
    await wait_for(lambda: time.time() - stamp > 1.0, 5, "keep_days (0.86 s) past")
    await daemon.start()
    await wait_for(lambda: (done / "a.result.zip").exists(), 10, "a's result at its name")
    # The newest finished job of an inbox is kept as its header reference, however old: a second one frees job 1.
    drop(tmp_path / "inbox" / "alpha", "b.csv", CSV.replace("1,2", "5,6"))
    await wait_for(lambda: (done / "b.result.zip").exists(), 20, "b's result at its name")
    await wait_for(lambda: [j["id"] for j in ledger.jobs()] == [2], 10, "job 1 pruned by keep_days")
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()
    assert (done / "a.result.zip").exists()
    assert not [p for p in done.iterdir() if p.name.endswith(".part")]
    assert downloads(emulator) == 2  # one each




async def _placed_with(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess], hook: str, *, no_part: bool = False
) -> tuple[DaemonProcess, LedgerView, Path]:
    """A daemon with ``hook`` that uploads a.csv and follows it until a result is recorded and at its name (and, with
    ``no_part``, no part is left)."""
    config = write_config(tmp_path, emulator.base_url, status={"poll_s": 0.2, "max_poll_s": 0.2})
    daemon = daemons(config)
    await daemon.start(env=_hooked(tmp_path, hook))
    drop(tmp_path / "inbox" / "alpha", "a.csv", CSV)
    ledger = LedgerView(tmp_path / "state" / "ledger.sqlite3")
    done = tmp_path / "inbox" / "alpha" / "done"

    def placed() -> bool:
        jobs = ledger.jobs()
        if not jobs or not jobs[0]["result_path"] or not (done / jobs[0]["result_path"].removeprefix("done/")).exists():
            return False
        return not no_part or not [p for p in done.iterdir() if p.name.endswith(".part")]

    await wait_for(placed, 30, "a result placed")
    return daemon, ledger, done

async def test_a_user_file_at_the_result_name_between_plan_and_rename_is_kept_and_the_result_lands_beside(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    daemon, ledger, done = await _placed_with(tmp_path, emulator, daemons, "user-takes-name")
    # The first record names done/a.result.zip, where the user's file stands: "placed" holds until that record is
    # undone. Stop only once the result has landed beside it (stopped in between, the next start downloads again).
    await wait_for(lambda: ledger.jobs()[0]["result_path"] == "done/a.job1.result.zip", 30, "the result beside")
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()
    [job] = ledger.jobs()
    assert job["result_path"] == "done/a.job1.result.zip", job
    assert (done / "a.result.zip").read_text() == "the user's own file\n"
    assert names(done) == ["a.csv", "a.job1.result.zip", "a.result.zip"]
    assert [e["event"] for e in ledger.events(job["id"]) if e["event"].startswith("result_")] == [
        "result_downloaded",
        "result_not_placed",
        "result_downloaded",
    ]


async def test_a_failed_unlink_of_the_part_after_the_result_got_its_name_downloads_it_once(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    daemon, ledger, done = await _placed_with(tmp_path, emulator, daemons, "unlink-fails-once", no_part=True)
    await stopped_with_one_result(daemon, ledger, done, emulator)


async def test_a_recorded_part_of_a_job_from_before_schema_3_gets_its_name_at_the_next_start(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    daemon, ledger, done = await _killed("kill-before-name", tmp_path, emulator, daemons)
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite3", isolation_level=None)
    db.execute("UPDATE jobs SET inbox = NULL")  # a job made by a version before schema 3, finished after the upgrade
    db.close()
    [job] = ledger.jobs()
    assert job["result_path"] == "done/a.result.zip" and job["inbox"] is None, job
    await daemon.start()  # recovery (the parts) is done by service.started
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()
    [job] = ledger.jobs()
    assert (done / job["result_path"].removeprefix("done/")).exists(), (job["result_path"], names(done))
    assert downloads(emulator) == 1


async def test_a_user_file_at_the_name_of_a_recorded_part_at_start_is_kept_and_the_result_comes_beside(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    """Killed with the result recorded but still at its part; the user puts a file at done/a.result.zip before the
    restart: it is kept, the record undone (result_not_placed), and the result downloaded to a.job1.result.zip."""
    daemon, ledger, done = await _killed("kill-before-name", tmp_path, emulator, daemons)
    (done / "a.result.zip").write_text("the user's own file\n")
    await daemon.start()
    await wait_for(
        lambda: ledger.jobs()[0]["result_path"] == "done/a.job1.result.zip" and (done / "a.job1.result.zip").exists(),
        20,
        "the result beside the user's file",
    )
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()
    assert (done / "a.result.zip").read_text() == "the user's own file\n"
    assert names(done) == ["a.csv", "a.job1.result.zip", "a.result.zip"]
    assert [e["event"] for e in ledger.events(1) if e["event"].startswith("result_")] == [
        "result_downloaded",
        "result_not_placed",
        "result_downloaded",
    ]


# -- 2. Service._held_names: an open reject whose name is not UTF-8 holds its real name too at a restart --------------


async def test_the_real_name_held_by_a_restarted_reject_is_released_and_a_later_drop_of_the_same_bytes_is_taken(
    rig: Callable[..., Rig],  # noqa: F811
    unprivileged: Path,  # noqa: F811
    emulator: Emulator,
    teardown_daemons: list[Rig],  # noqa: F811
) -> None:
    """The restart holds the reject under its escaped and its real (byte) name; once it closes, both are let go: a
    new file dropped under the same bytes, while the same process runs, becomes a job of its own (no name held for
    good), and is failed with its own error file."""
    name = b"hh\xffbad.csv"
    r = rig(unprivileged)
    try:
        await reject_kept_open_across_a_restart(r, unprivileged, teardown_daemons, name, table(71))  # both names held
    finally:
        r.inbox.chmod(0o755)
    await r.ledger.all_closed(1, why="once the inbox is writable")
    await wait_for(lambda: not r.present(name), 10, "the first file moved out" + r.context())
    r.drop(name, table(72))  # the same bytes again, same process
    give_to_nobody(unprivileged)
    await r.ledger.all_closed(2, why="the second drop under the same name")
    await wait_for(lambda: not r.present(name), 10, "the second file moved out" + r.context())
    assert len(r.error_files()) == 2, r.context()
    assert all(report["missing"] == [] for report in r.error_files().values()), r.context()
    code, _ = await r.daemon.terminate()
    assert code == 0, r.daemon.tail()
    r.check(uploads=0)
