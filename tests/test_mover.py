"""Moves into done/ and failed/ when either is a symlink to an archive on another filesystem (a real tmpfs): copied
like ``mv``, and a replay after a crash at any point neither loses nor duplicates a file."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from retrain_uploader.closer import close_job
from retrain_uploader.ledger import Ledger, State
from retrain_uploader.mover import apply_moves, plan_moves, rename_no_replace

CSV = b"id,age,plan\n1,34,basic\n2,51,premium\n"


@pytest.fixture
def inbox(tmp_path: Path, small_disk: Path) -> Path:
    """An inbox whose done/ and failed/ are symlinks into archive folders on another filesystem."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("done", "failed"):
        (small_disk / name).mkdir()
        (inbox / name).symlink_to(small_disk / name)
    assert os.stat(inbox).st_dev != os.stat(small_disk).st_dev
    return inbox


def dropped(inbox: Path, name: str, data: bytes = CSV) -> Path:
    path = inbox / name
    path.write_bytes(data)
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    return path


def test_a_move_into_a_folder_on_another_filesystem_is_a_copy_then_an_unlink(inbox: Path) -> None:
    src = dropped(inbox, "a.csv")
    targets = plan_moves(inbox, ["a.csv"], "done", job_id=1)
    assert apply_moves(inbox, ["a.csv"], targets) == []  # raised EXDEV (forever, at each retry)
    moved = inbox / "done" / "a.csv"
    assert moved.read_bytes() == CSV
    assert moved.stat().st_mtime_ns == 1_700_000_000_123_456_789  # kept, like mv
    assert not src.exists()
    assert sorted(os.listdir(inbox / "done")) == ["a.csv"]  # no hidden part left behind


def test_a_replay_after_a_crash_mid_copy_finishes_the_move(inbox: Path) -> None:
    src = dropped(inbox, "a.csv")
    targets = plan_moves(inbox, ["a.csv"], "done", job_id=1)
    (inbox / "done" / ".a.csv.moving").write_bytes(CSV[:7])  # what the crash left half-written
    assert apply_moves(inbox, ["a.csv"], targets) == []
    assert (inbox / "done" / "a.csv").read_bytes() == CSV and not src.exists()
    assert sorted(os.listdir(inbox / "done")) == ["a.csv"]


def test_a_replay_after_a_crash_between_rename_and_unlink_removes_the_source_once(inbox: Path) -> None:
    src = dropped(inbox, "a.csv")
    targets = plan_moves(inbox, ["a.csv"], "done", job_id=1)
    shutil.copy2(src, inbox / "done" / "a.csv")  # copied and renamed into place; the crash came before the unlink
    assert apply_moves(inbox, ["a.csv"], targets) == []
    assert not src.exists()  # was left in the inbox, to be uploaded again as a new job
    assert (inbox / "done" / "a.csv").read_bytes() == CSV
    assert apply_moves(inbox, ["a.csv"], targets) == []  # and a second replay changes nothing
    assert (inbox / "done" / "a.csv").read_bytes() == CSV


def test_a_new_drop_under_a_moved_name_is_kept(inbox: Path) -> None:
    dropped(inbox, "a.csv")
    targets = plan_moves(inbox, ["a.csv"], "done", job_id=1)
    apply_moves(inbox, ["a.csv"], targets)
    newer = dropped(inbox, "a.csv", CSV + b"3,22,basic\n")  # the user drops a new file under the same name
    assert apply_moves(inbox, ["a.csv"], targets) == []  # a replay
    assert newer.read_bytes() == CSV + b"3,22,basic\n"
    assert (inbox / "done" / "a.csv").read_bytes() == CSV


def test_a_source_gone_before_the_move_is_reported_missing(inbox: Path) -> None:
    targets = plan_moves(inbox, ["gone.csv"], "failed", job_id=3)
    assert apply_moves(inbox, ["gone.csv"], targets) == ["gone.csv"]
    assert os.listdir(inbox / "failed") == []


def test_a_rejected_symlink_is_moved_as_a_symlink(inbox: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.csv").write_bytes(CSV)
    (inbox / "link.csv").symlink_to(tmp_path / "elsewhere.csv")
    targets = plan_moves(inbox, ["link.csv"], "failed", job_id=4)
    assert apply_moves(inbox, ["link.csv"], targets) == []
    moved = inbox / "failed" / "link.csv"
    assert moved.is_symlink() and os.readlink(moved) == str(tmp_path / "elsewhere.csv")
    assert not os.path.lexists(inbox / "link.csv")


def test_rename_no_replace_back_from_another_filesystem(inbox: Path) -> None:
    archived = inbox / "failed" / "a.csv"
    archived.write_bytes(CSV)
    rename_no_replace(archived, inbox / "a.csv")  # `retry` puts a failed job's files back into the inbox
    assert (inbox / "a.csv").read_bytes() == CSV and not archived.exists()
    (inbox / "failed" / "b.csv").write_bytes(CSV)
    (inbox / "b.csv").write_bytes(b"a newer drop")
    with pytest.raises(FileExistsError) as info:
        rename_no_replace(inbox / "failed" / "b.csv", inbox / "b.csv")
    assert info.value.errno == errno.EEXIST
    assert (inbox / "b.csv").read_bytes() == b"a newer drop"


def test_closing_a_job_through_the_ledger_moves_into_the_archive_and_a_replay_is_harmless(
    inbox: Path, tmp_path: Path
) -> None:
    # (The daemon end to end needs the watcher to leave a done/ symlink alone: another change of issue 9.)
    src = dropped(inbox, "a.csv")
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        job = ledger.create_job(model="alpha", kind="csv", name="a", sources=["a.csv"], upload_filename="a.csv")
        job = ledger.update(job.id, state=State.UPLOADED)
        closed = close_job(ledger, job, inbox)  # raised EXDEV: the job never closed
        assert closed.closed and closed.moved_to == ("done/a.csv",)
        assert close_job(ledger, ledger.update(job.id, closed=0), inbox).closed  # a replay after a crash
    assert (inbox / "done" / "a.csv").read_bytes() == CSV and not src.exists()
    assert os.listdir(inbox / "done") == ["a.csv"]
