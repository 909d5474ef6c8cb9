"""Adversarial review of session 5's changes (real daemon processes, the emulator on 127.0.0.1, real files, kill -9).

1. ledger: one timestamp per transaction, job rows built by position (a plan per column count), RETURNING rows from
   create_job / claim_content, the queued->packaging move folded into the packaged update.
2. rejects whose name is not UTF-8: recorded under the ``\\xff``-escaped name, found again by ``closer.on_disk_name``.
3. result downloads: ``done/.NAME.result.zip.jobN.part``, given its name after the record; ``Service._recover_results``
   at start.

Four defects were found and fixed (each test below failed before its fix):
``test_a_not_utf8_reject_beside_a_file_literally_named_like_its_escape_goes_to_failed`` (``on_disk_name`` took a file
literally named like the escape without looking at its inode),
``test_a_reload_during_a_result_download_leaves_its_part_alone`` (a reload that made the watchers again removed the
part of a download under way: now once per inbox and process),
``test_without_hard_links_a_kill_9_after_the_result_lands_downloads_it_once`` (the result was hard-linked, or renamed
where there are no hard links, before its record: now recorded first, then renamed), and
``test_a_folder_named_like_a_result_part_in_done_does_not_stop_the_start`` (only regular files are removed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from retrain_uploader.emulator import Emulator, _result_zip
from retrain_uploader.ledger import _MIGRATIONS, SCHEMA_VERSION, Ledger, LedgerUnreadable, State, _split_sql

from ._proc import DaemonProcess, LedgerView, write_config
from .conftest import KEYS, drop, sitecustomize_env, wait_for

pytestmark = pytest.mark.slow

CSV = "x,y,label\n1,2,a\n3,4,b\n"


def _table(seed: int) -> str:
    return "x,y,label\n" + "".join(f"{seed},{i},{'ab'[i % 2]}\n" for i in range(6))


def _ledger(tmp_path: Path) -> LedgerView:
    return LedgerView(tmp_path / "state" / "ledger.sqlite3")


# -- 1. the ledger ------------------------------------------------------------------------------------------------


def _old_ledger(path: Path, version: int) -> None:
    """A ledger as a daemon of schema ``version`` left it, with one job row of that schema."""
    db = sqlite3.connect(path, isolation_level=None)
    for step in _MIGRATIONS[:version]:
        for statement in _split_sql(step):
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {version}")
    db.execute(
        "INSERT INTO jobs (model, kind, name, sources, upload_filename, state, sha256, content_sha256, size_bytes,"
        " retrain_job_id, put_started, attempts, moved_to, closed, created_at, updated_at)"
        " VALUES ('alpha', 'csv', 'old', '[\"old.csv\"]', 'old.csv', 'failed', 's', 'c', 12, 'r-1', 1, 3,"
        " '[\"failed/old.csv\", \"failed/old.error.json\"]', 1, '2026-01-01T00:00:00.000Z', '2026-01-02T00:00:00.000Z')"
    )
    db.close()


@pytest.mark.parametrize("version", [1, 2, 4, 6])
def test_rows_of_an_older_schema_are_read_right_after_migration_and_beside_a_current_ledger(
    tmp_path: Path, version: int
) -> None:
    """The row plan is cached by column count: a current ledger read first, then an old one migrated (columns added at
    the end), in one process, must give every field of the old row in its own slot."""
    current = Ledger(tmp_path / "current.sqlite3")
    made = current.create_job(model="beta", kind="csv", name="n", sources=["n.csv"], upload_filename="n.csv")
    assert current.get(made.id) == made
    current.close()

    path = tmp_path / "old.sqlite3"
    _old_ledger(path, version)
    with pytest.raises(LedgerUnreadable, match="older"):
        Ledger(path, read_only=True)  # the read-only CLI never reads rows of another schema
    with Ledger(path) as ledger:  # the daemon migrates it
        [job] = ledger.jobs()
        assert (job.model, job.kind, job.name, job.sources, job.upload_filename) == (
            "alpha", "csv", "old", ("old.csv",), "old.csv")
        assert job.state is State.FAILED and job.put_started is True and job.closed is True
        assert (job.sha256, job.content_sha256, job.size_bytes, job.attempts) == ("s", "c", 12, 3)
        assert job.moved_to == ("failed/old.csv", "failed/old.error.json")
        assert (job.created_at, job.updated_at) == ("2026-01-01T00:00:00.000Z", "2026-01-02T00:00:00.000Z")
        assert job.inbox is None and job.source_ids is None and job.header is None and job.watched_s is None
        new = ledger.create_job(model="alpha", kind="csv", name="b", sources=["b.csv"], upload_filename="b.csv")
        assert ledger.get(new.id) == new
    with Ledger(path, read_only=True) as ro:
        assert [j.name for j in ro.jobs()] == ["old", "b"]
        assert int(ro._db.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION


def test_stamps_are_one_per_transaction_and_never_repeat_or_go_back_across_transactions(tmp_path: Path) -> None:
    ticks = iter(1_800_000_000.0 + i * 0.001 for i in range(10_000))
    ledger = Ledger(tmp_path / "l.sqlite3", clock=lambda: next(ticks))
    a = ledger.create_job(model="m", kind="csv", name="a", sources=["a.csv"], upload_filename="a.csv")
    with ledger.batch():
        b = ledger.create_job(model="m", kind="csv", name="b", sources=["b.csv"], upload_filename="b.csv")
        b2 = ledger.update(b.id, state=State.PACKAGING)
        inside = ledger.now()
    after = ledger.now()
    c = ledger.update(a.id, state=State.PACKAGING)
    assert b.created_at == b2.updated_at == inside  # one commit, one instant
    stamps = [a.created_at, b.created_at, after, c.updated_at]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), stamps
    events = [e["at"] for j in (a.id, b.id) for e in ledger.events(j)]
    assert events == sorted(events[:2]) + sorted(events[2:])
    ledger.close()



def _in_place(ledger: LedgerView, done: Path) -> bool:
    """The result recorded and at its name (it is recorded just before it is renamed there from its part)."""
    jobs = ledger.jobs()
    return bool(jobs and jobs[0]["result_path"] and (done / "a.result.zip").exists())

async def test_the_same_content_dropped_under_many_names_at_once_is_uploaded_once(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    """claim_content now returns the claimed row: two jobs of one content claimed by the pool together, one sends."""
    config = write_config(tmp_path, emulator.base_url, pool={"workers": 4, "shutdown_grace_s": 5})
    daemon = await daemons(config).start()
    inbox = tmp_path / "inbox" / "alpha"
    for i in range(6):
        drop(inbox, f"same{i}.csv", _table(7))
    ledger = _ledger(tmp_path)
    jobs = await ledger.all_closed(6, 30)
    assert len([u for u in emulator.uploads]) == 1, emulator.uploads
    states = sorted(j["state"] for j in jobs)
    assert states.count("duplicate") == 5, states
    for job in jobs:  # the folded packaging move: its event is there, before `packaged`, at no later time
        events = ledger.events(job["id"])
        names = [e["event"] for e in events]
        assert names.index("packaged") > 0 and names[: names.index("packaged")][-1] == "state", names
        ats = [e["at"] for e in events]
        assert ats == sorted(ats), events
        assert job["updated_at"] >= ats[-1] >= job["created_at"]
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()


# -- 2. names that are not UTF-8 ------------------------------------------------------------------------------------


def _read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _present(path: bytes) -> bool:
    return os.path.lexists(path)


def _listing(folder: Path) -> list[bytes]:
    return sorted(os.listdir(os.fsencode(folder)))


async def test_a_not_utf8_reject_beside_a_file_literally_named_like_its_escape_goes_to_failed(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    config = write_config(tmp_path, emulator.base_url)
    inbox = tmp_path / "inbox" / "alpha"
    inbox.mkdir(parents=True)
    # Half a pair (waits for its partner, stays in the inbox): its name is the text the reject is recorded under.
    literal = "x\\xff.train.csv"
    drop(inbox, literal, _table(1))
    real = os.path.join(os.fsencode(inbox), b"x\xff.train.csv")
    with open(real, "wb") as f:
        f.write(_table(2).encode())
    daemon = await daemons(config).start()
    ledger = _ledger(tmp_path)
    [job] = await ledger.all_closed(1, 20)
    assert job["sources"] == [literal] and job["state"] == "failed", job
    await daemon.terminate()
    assert (inbox / literal).read_bytes() == _table(1).encode()  # the literal half waits, untouched
    assert not _present(real), (job, _listing(inbox), daemon.tail())  # the reject left the inbox
    assert _read(os.path.join(os.fsencode(inbox), os.fsencode(job["moved_to"][0]))) == _table(2).encode()


async def test_a_utf8_name_with_backslash_x_text_and_a_not_utf8_name_are_each_failed_under_their_own_name(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    """Names that are valid UTF-8 but hold ``\\x`` text (even ``\\xff``, which real_name turns into a byte) are their
    own entries; a non-UTF-8 name whose escape is not present as text is found by its inode; kill -9 mid-way."""
    config = write_config(tmp_path, emulator.base_url)
    inbox = tmp_path / "inbox" / "alpha"
    inbox.mkdir(parents=True)
    texts = {"notes\\x41.txt": b"a", "notes\\xff.txt": b"b", "n\\xzz.txt": b"c"}
    for name, data in texts.items():
        drop(inbox, name, data)
    real = os.path.join(os.fsencode(inbox), b"bad\\x41\xfe.txt")  # text escape and a real byte in one name
    with open(real, "wb") as f:
        f.write(b"d")
    daemon = await daemons(config).start()
    ledger = _ledger(tmp_path)
    jobs = await ledger.all_closed(4, 20)
    await daemon.kill()
    await daemon.start()  # closing again finds nothing to do
    assert _listing(inbox) == [b"done", b"failed"], _listing(inbox)
    by_source = {j["sources"][0]: j for j in jobs}
    assert set(by_source) == {*texts, "bad\\x41\\xfe.txt"}, by_source
    for name, data in [*texts.items(), ("bad\\x41\\xfe.txt", b"d")]:
        target = os.path.join(os.fsencode(inbox), os.fsencode(by_source[name]["moved_to"][0]))
        assert _read(target) == data, (name, by_source[name])
    assert len(ledger.jobs()) == 4
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()


# -- 3. result downloads --------------------------------------------------------------------------------------------


class GatedResults(Emulator):
    """The emulator, whose result download sends half its body and then waits for ``release`` (a download under way
    for as long as a test needs)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.release = asyncio.Event()
        self.streaming = asyncio.Event()

    async def _result(self, request: web.Request) -> web.StreamResponse:  # type: ignore[override]
        rejected = self._verify(request.raw_path)
        if rejected is not None:
            return rejected
        body = _result_zip(self._jobs[request.match_info["job_id"]])
        resp = web.StreamResponse(headers={"Content-Type": "application/zip", "Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        self.streaming.set()
        await self.release.wait()
        await resp.write(body[len(body) // 2 :])
        await resp.write_eof()
        return resp


async def test_a_reload_during_a_result_download_leaves_its_part_alone(
    tmp_path: Path, daemons: Callable[[Path], DaemonProcess]
) -> None:
    emulator = GatedResults(keys=KEYS)
    async with emulator:
        config = write_config(tmp_path, emulator.base_url)
        daemon = await daemons(config).start()
        done = tmp_path / "inbox" / "alpha" / "done"
        drop(tmp_path / "inbox" / "alpha", "a.csv", CSV)
        await asyncio.wait_for(emulator.streaming.wait(), 30)
        part = done / ".a.result.zip.job1.part"
        await wait_for(lambda: part.exists(), 10, "the part being written")
        # A reload that changes only [watch] settle_s.
        text = config.read_text().replace("settle_s = 0.1", "settle_s = 0.15")
        assert text != config.read_text()
        config.write_text(text)
        os.kill(daemon.pid, signal.SIGHUP)
        await wait_for(lambda: daemon.logged("config.reloaded"), 10, "the reload")
        removed = daemon.logged("result.removed_partial")
        emulator.release.set()
        ledger = _ledger(tmp_path)
        await wait_for(lambda: _in_place(ledger, done), 30, "the result in place")
        downloads = [r for r in emulator.requests if r.endpoint == "result"]
        failed = daemon.logged("retrain.download_failed")
        code, _ = await daemon.terminate()
        assert code == 0, daemon.tail()
        assert not removed, removed
        assert not failed, failed
        assert len(downloads) == 1, downloads
        assert sorted(p.name for p in done.iterdir()) == ["a.csv", "a.result.zip"]


_NO_LINKS_SITE = '''
import errno, os, signal, sys
_busy = []
def _hook(event, args):
    # A filesystem without hard links for result downloads: os.link of a result part fails as on vfat or some shares.
    if event == "os.link" and ".result.zip.job" in os.fsdecode(args[0]):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    # With KILL set: right after the fallback rename gave the result its name, before the record, kill -9.
    if (os.environ.get("KILL") and not _busy and event == "os.rename"
            and os.fsdecode(args[1]).endswith(".result.zip")):
        _busy.append(1)
        os.rename(args[0], args[1])
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(_hook)
'''


async def test_without_hard_links_a_result_is_still_downloaded_and_recorded_once(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    config = write_config(tmp_path, emulator.base_url)
    daemon = daemons(config)
    await daemon.start(env=sitecustomize_env(tmp_path / "site", _NO_LINKS_SITE))
    done = tmp_path / "inbox" / "alpha" / "done"
    drop(tmp_path / "inbox" / "alpha", "a.csv", CSV)
    ledger = _ledger(tmp_path)
    await wait_for(lambda: _in_place(ledger, done), 30, "the result in place")
    assert ledger.jobs()[0]["result_path"] == "done/a.result.zip"
    assert sorted(p.name for p in done.iterdir()) == ["a.csv", "a.result.zip"]
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()


async def test_without_hard_links_a_kill_9_after_the_result_lands_downloads_it_once(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess]
) -> None:
    config = write_config(tmp_path, emulator.base_url)
    daemon = daemons(config)
    env = {"KILL": "1", **sitecustomize_env(tmp_path / "site", _NO_LINKS_SITE)}
    await daemon.start(env=env)
    done = tmp_path / "inbox" / "alpha" / "done"
    drop(tmp_path / "inbox" / "alpha", "a.csv", CSV)
    await daemon.wait(30)
    assert daemon.returncode == -9, daemon.tail()
    ledger = _ledger(tmp_path)
    # Recorded before it got its name (it was recorded after, and the next start downloaded a second copy).
    assert ledger.jobs()[0]["result_path"] == "done/a.result.zip" and (done / "a.result.zip").exists()
    await daemon.start(env=sitecustomize_env(tmp_path / "site", _NO_LINKS_SITE))  # still no hard links, no kill
    await wait_for(lambda: _in_place(ledger, done), 30, "the result in place")
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()
    assert ledger.jobs()[0]["result_path"] == "done/a.result.zip"
    assert len([r for r in emulator.requests if r.endpoint == "result"]) == 1
    assert sorted(p.name for p in done.iterdir()) == ["a.csv", "a.result.zip"]


@pytest.mark.parametrize("name", [".a.result.zip.job1.part", ".a.result.zip.part"])
async def test_a_folder_named_like_a_result_part_in_done_does_not_stop_the_start(
    tmp_path: Path, emulator: Emulator, daemons: Callable[[Path], DaemonProcess], name: str
) -> None:
    """Whatever a user leaves in done/ under a part's name, the daemon starts and uploads (no crash loop at start)."""
    config = write_config(tmp_path, emulator.base_url)
    done = tmp_path / "inbox" / "alpha" / "done"
    (done / name).mkdir(parents=True)
    (done / name / "keep.txt").write_text("mine")
    daemon = daemons(config)
    await daemon.start(ready=False)
    await wait_for(lambda: not daemon.running or daemon.logged("service.started"), 20, "the start or an exit")
    assert daemon.running, daemon.tail()
    drop(tmp_path / "inbox" / "alpha", "a.csv", CSV)
    await _ledger(tmp_path).all_closed(1, 20)
    assert (done / name / "keep.txt").read_text() == "mine"
    code, _ = await daemon.terminate()
    assert code == 0, daemon.tail()
