"""The closer's take, attacked (an adversarial review found each of these against the first version of the take):
a drop where the user had taken the source, a put-back under a name too long, a hidden file left by an earlier
ledger's job of the same id, and a kill -9 inside the put-back. Real files, a real SIGKILL in a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from retrain_uploader.closer import close_job, taken_name
from retrain_uploader.ledger import Ledger
from retrain_uploader.packager import source_identity

from .conftest import armed, done_contents, drop
from .test_closer import uploaded_job


def _hidden(inbox: Path) -> list[str]:
    return sorted(p.name for p in inbox.iterdir() if p.name.startswith(".retrain-uploader."))


def test_a_drop_where_the_user_took_the_source_is_not_moved(
    tmp_path: Path, before_renames: list[Callable[[str, str, str], None]]
) -> None:
    """The user took c.csv away after its upload, and drops a new c.csv while the job closes: the source is reported
    missing, and the new file (never checked, never sent) stays in the inbox, untouched."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    newer = b"a,b\n" + b"8,8\n" * 40
    with Ledger(tmp_path / "l.db") as ledger:
        job_id = uploaded_job(ledger, inbox, "c.csv", 160)
        os.rename(inbox / "c.csv", tmp_path / "kept-by-user.csv")
        renames: list[tuple[str, str]] = []

        def hook(event: str, src: str, dst: str) -> None:
            if not renames:  # the first rename of the close, whatever it is: the new drop lands just before it
                # (the first version of the take renamed the *name* of a source gone: this drop went to done/)
                armed.clear()
                drop(inbox, "c.csv", newer)
                armed.append(hook)
            renames.append((src, dst))

        (inbox / "done").mkdir()
        before_renames.append(hook)
        closed = close_job(ledger, ledger.get(job_id), inbox)
        before_renames.clear()
        if not renames:  # nothing was renamed at all (the fix: a source gone is never moved by its name): drop it now
            drop(inbox, "c.csv", newer)
        assert closed.closed
        assert newer not in done_contents(inbox), f"an unchecked drop moved to done/: {closed.moved_to}"
        assert (inbox / "c.csv").read_bytes() == newer
        closed_event = [e for e in ledger.events(job_id) if e["event"] == "closed"][-1]
        assert closed_event["detail"]["moved_to"] == ["done/c.csv"]  # planned; nothing is there
        assert not (inbox / "done" / "c.csv").exists()


def test_a_put_back_whose_tagged_name_is_too_long_still_comes_back_visible(
    tmp_path: Path, before_renames: list[Callable[[str, str, str], None]]
) -> None:
    """Two drops around the take with a 240-byte name (accepted by the watcher) and a job id of three digits:
    NAME.jobNNN-restored.csv would be 256 bytes (ENAMETOOLONG). It comes back as jobNNN-restored.csv."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    name = "n" * 236 + ".csv"
    second, third = b"a,b\n2,2\n", b"a,b\n3,3\n"
    drops = [second, third]

    def hook(event: str, src: str, dst: str) -> None:
        take = len(drops) == 2 and event == "os.rename" and src == str(inbox / name)
        put_back = len(drops) == 1 and event == "os.link" and dst == str(inbox / name)
        if take or put_back:
            armed.clear()
            drop(inbox, name, drops.pop(0))
            armed.append(hook)

    with Ledger(tmp_path / "l.db") as ledger:
        for _ in range(99):  # a daemon that has run a while
            ledger.create_job(model="m", kind="csv", name="x", sources=["x"], upload_filename="x", inbox=str(inbox))
        job_id = uploaded_job(ledger, inbox, name, 160)
        assert job_id >= 100
        before_renames.append(hook)
        closed = close_job(ledger, ledger.get(job_id), inbox)
        before_renames.clear()
        assert drops == [] and closed.closed
        assert (inbox / f"job{job_id}-restored.csv").read_bytes() == second, _hidden(inbox)
        assert (inbox / name).read_bytes() == third
        assert _hidden(inbox) == []


def test_a_hidden_file_left_by_an_earlier_ledgers_job_of_the_same_id_is_not_touched(tmp_path: Path) -> None:
    """A crash under an earlier ledger left a source at its hidden name; the ledger was then made anew, and its job 1
    closes now. The names differ (each holds the inode its job checked, which the left file keeps in use): the
    checked file goes to done/, the left one stays where it is."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    left = inbox / "old.csv"
    left.write_bytes(b"a,b\n5,5\n")
    left_name = taken_name(1, 0, source_identity(left))
    left.rename(inbox / left_name)
    with Ledger(tmp_path / "l.db") as ledger:
        job_id = uploaded_job(ledger, inbox, "c.csv", 160)
        assert job_id == 1
        checked = (inbox / "c.csv").read_bytes()
        closed = close_job(ledger, ledger.get(job_id), inbox)
        assert closed.moved_to == ("done/c.csv",) and done_contents(inbox) == {checked}
        assert (inbox / left_name).read_bytes() == b"a,b\n5,5\n"


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from retrain_uploader.closer import close_job
    from retrain_uploader.ledger import Ledger
    db, inbox, taken = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    def hook(event, args):
        if event == "os.remove" and os.fsdecode(args[0]) == taken:
            os.kill(os.getpid(), signal.SIGKILL)  # after the put-back's link, before its unlink
    sys.addaudithook(hook)
    with Ledger(Path(db)) as ledger:
        close_job(ledger, ledger.get(1), inbox)
    """
)


def test_kill_9_inside_the_put_back_leaves_one_file_for_one_drop(tmp_path: Path) -> None:
    """A real kill -9 between the put-back's link and its unlink: the next close finds the hidden name and the
    user's name on the same inode, and drops the hidden one (not a second name, which would be a second job)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    db = tmp_path / "l.db"
    with Ledger(db) as ledger:
        job_id = uploaded_job(ledger, inbox, "c.csv", 160)
        job = ledger.update(job_id, moved_to=["done/c.csv"])
    assert job.source_ids is not None
    taken = inbox / taken_name(job_id, 0, job.source_ids["c.csv"])
    (inbox / "done").mkdir()
    drop(inbox, "c.csv", b"a,b\n7,7\n")  # a newer drop landed, and the take held it (a kill -9 followed)
    os.rename(inbox / "c.csv", taken)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(db), str(inbox), str(taken)], capture_output=True, check=False, timeout=60
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert (inbox / "c.csv").exists() and taken.exists()  # killed in between
    with Ledger(db) as ledger:  # the next start closes it again
        closed = close_job(ledger, ledger.get(job_id), inbox)
    assert closed.closed and closed.moved_to == ("",)
    names = sorted(p.name for p in inbox.iterdir() if p.is_file())
    assert names == ["c.csv"], f"one drop, now: {names}"
    assert (inbox / "c.csv").read_bytes() == b"a,b\n7,7\n"


def test_a_put_back_on_a_full_filesystem_keeps_the_job_open_until_it_can(
    tmp_path: Path, small_disk: Path, before_renames: list[Callable[[str, str, str], None]]
) -> None:
    """The take is a rename; the put-back a link, which a full filesystem can refuse (tmpfs counts an inode per
    link). The close then fails (OSError: the service logs job.close_failed and closes it again later); the new drop
    waits at the hidden name, and the next close, with space back, puts it back. Found by review: the first version
    closed the job and left the file hidden for good."""
    disk = small_disk
    subprocess.run(["mount", "-o", "remount,nr_inodes=64", str(disk)], check=True)
    inbox = disk / "inbox"
    inbox.mkdir()
    newer = b"a,b\n5,5\n"
    fillers: list[Path] = []

    def hook(event: str, src: str, dst: str) -> None:
        if event == "os.rename" and src == str(inbox / "c.csv") and dst.endswith(".closing"):
            armed.clear()
            drop(inbox, "c.csv", newer)  # a new drop lands in the instant before the take
            for i in range(1000):  # and the filesystem fills up
                try:
                    (disk / f"fill{i}").touch()
                except OSError:
                    break
                fillers.append(disk / f"fill{i}")

    with Ledger(tmp_path / "l.db") as ledger:
        job_id = uploaded_job(ledger, inbox, "c.csv", 160)
        before_renames.append(hook)
        with pytest.raises(OSError, match="No space left"):
            close_job(ledger, ledger.get(job_id), inbox)
        before_renames.clear()
        assert fillers and not ledger.get(job_id).closed
        for f in fillers:
            f.unlink()  # space is back
        closed = close_job(ledger, ledger.get(job_id), inbox)
        assert closed.closed and closed.moved_to == ("",)
        assert (inbox / "c.csv").read_bytes() == newer
        assert _hidden(inbox) == [] and done_contents(inbox) == set()
