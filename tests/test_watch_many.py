"""Many models, one watch: every inbox is event-watched by a single inotify instance, reload adds and removes inboxes
in it, and inboxes beyond the inotify room are polled rather than left to the rescan."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from retrain_uploader.config import Settings, WatchSettings
from retrain_uploader.emulator import Emulator
from retrain_uploader.service import Service
from retrain_uploader.watcher import Candidate, InboxWatcher, Reject
from retrain_uploader.watchhub import WatchHub

from ._proc import write_config
from .conftest import drop, wait_for

NO_RESCAN = {"settle_s": 0.05, "rescan_s": 30}  # a file taken before 30 s was found by the event watch


def inotify_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):  # the listing's own fd is gone by the time it is read
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except FileNotFoundError:
            continue
    return count


def threads() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


async def test_forty_inboxes_share_one_inotify_instance_and_each_is_event_watched(
    tmp_path: Path, emulator: Emulator
) -> None:
    keys = {f"m{i:02d}": "key-alpha-0001" for i in range(40)}
    settings = Settings.from_toml(write_config(tmp_path, emulator.base_url, keys=keys, watch=NO_RESCAN))
    before_inotify, before_threads = inotify_fds(), threads()
    service = Service(settings, handle_signals=False)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        for i, model in enumerate(keys):
            drop(tmp_path / "inbox" / model, f"f{i}.csv", f"a,b\n{i},{i}\n")
        await wait_for(lambda: len([j for j in service.ledger.jobs() if j.closed]) == len(keys), timeout=20,
                       what="a job per inbox, long before the 30 s rescan")
        inotify, grown = inotify_fds() - before_inotify, threads() - before_threads
        models = sorted(j.model for j in service.ledger.jobs())
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 15)
    assert inotify == 1  # before: one per model
    assert grown < 10  # before: one watch thread per model
    assert models == sorted(keys)


async def test_reload_adds_an_inbox_to_the_one_watch_and_removes_one_from_it(
    tmp_path: Path, emulator: Emulator
) -> None:
    config = write_config(tmp_path, emulator.base_url, keys={"alpha": "key-alpha-0001"}, watch=NO_RESCAN)
    service = Service(Settings.from_toml(config), handle_signals=False)
    task = asyncio.create_task(service.run())
    alpha, beta = tmp_path / "inbox" / "alpha", tmp_path / "inbox" / "beta"

    def closed() -> list[str]:
        return sorted(j.upload_filename for j in service.ledger.jobs() if j.closed)

    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        write_config(tmp_path, emulator.base_url, keys={"alpha": "key-alpha-0001", "beta": "key-beta-0002"},
                     watch=NO_RESCAN)
        assert service.reload()
        await wait_for(lambda: service.watch_hub.mode(str(beta)) == "events" and beta.is_dir(), what="beta added")
        drop(beta, "b1.csv", "a,b\n1,1\n")
        await wait_for(lambda: closed() == ["b1.csv"], timeout=8, what="beta's file, by its event")
        write_config(tmp_path, emulator.base_url, keys={"beta": "key-beta-0002"}, watch=NO_RESCAN)
        assert service.reload()
        drop(alpha, "a1.csv", "a,b\n2,2\n")
        drop(beta, "b2.csv", "a,b\n3,3\n")
        await wait_for(lambda: closed() == ["b1.csv", "b2.csv"], timeout=8, what="beta still event-watched")
        assert inotify_fds() == 1
        assert closed() == ["b1.csv", "b2.csv"]
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 15)
    assert (alpha / "a1.csv").exists()  # alpha is no longer a model: its files are left alone


async def test_inboxes_beyond_the_event_slots_are_polled_not_left_to_the_rescan(tmp_path: Path) -> None:
    settings = WatchSettings(settle_s=0.05, rescan_s=30, poll_delay_ms=50)
    hub = WatchHub(settings, event_slots=1)
    taken: list[tuple[str, str]] = []
    stop = asyncio.Event()
    watchers: list[InboxWatcher] = []
    for name in ("a", "b", "c"):
        inbox = tmp_path / name
        inbox.mkdir()

        async def on_candidate(candidate: Candidate, name: str = name) -> None:
            taken.append((name, candidate.upload_filename))

        async def on_reject(reject: Reject) -> None:
            raise AssertionError(reject)

        watchers.append(InboxWatcher(name, inbox, settings, on_candidate=on_candidate, on_reject=on_reject,
                                     is_taken=lambda _: False, hub=hub))
    tasks = [asyncio.create_task(w.run(stop)) for w in watchers]
    tasks.append(asyncio.create_task(hub.run(stop)))
    try:
        await asyncio.sleep(0)  # the watchers register, then the hub sets its watches up
        assert [hub.mode(str(tmp_path / n)) for n in "abc"] == ["events", "polling", "polling"]
        await wait_for(lambda: inotify_fds() >= 1, what="the event watch set up")
        for name in "abc":
            drop(tmp_path / name, f"{name}.csv", "a,b\n1,2\n")
        await wait_for(lambda: len(taken) == 3, timeout=5, what="every inbox's file, well before the rescan")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert sorted(taken) == [("a", "a.csv"), ("b", "b.csv"), ("c", "c.csv")]


class Pokes:
    """A member of the hub that counts its wake-ups (each one is a scan of the whole inbox in the daemon)."""

    def __init__(self, inbox: Path) -> None:
        self.inbox_path = str(inbox)
        self.count = 0

    def poke(self) -> None:
        self.count += 1


async def test_hidden_and_temporary_names_wake_no_scan(tmp_path: Path) -> None:
    """A copy tool's hidden or temporary name, and the closer's take of a source (a rename to a hidden name for every
    job), bring nothing to take: a scan for each would read a backlog's whole inbox once per job."""
    hub = WatchHub(WatchSettings(settle_s=0.05, rescan_s=30), event_slots=2)
    quiet, marker = tmp_path / "quiet", tmp_path / "marker"
    quiet.mkdir()
    marker.mkdir()
    members = [Pokes(quiet), Pokes(marker)]
    for member in members:
        hub.add(member)
    stop = asyncio.Event()
    task = asyncio.create_task(hub.run(stop))
    try:
        await wait_for(lambda: inotify_fds() >= 1 and all(m.count for m in members), what="the watch set up")
        before = members[0].count
        for name in (".a.csv.incoming", "b.csv.part", "c.csv.tmp", "d.csv~"):
            (quiet / name).write_text("a,b\n1,2\n")
        os.rename(quiet / ".a.csv.incoming", quiet / ".retrain-uploader.job1.0.closing")
        (quiet / "b.csv.part").unlink()
        # Events come in order from the one inotify instance: once the marker's is routed, so were the quiet ones.
        marked = members[1].count
        (marker / "m.csv").write_text("a,b\n1,2\n")
        await wait_for(lambda: members[1].count > marked, what="the marker's event")
        assert members[0].count == before, "a hidden or temporary name woke a scan"
        (quiet / "e.csv").write_text("a,b\n1,2\n")
        await wait_for(lambda: members[0].count > before, what="a visible name's event")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
