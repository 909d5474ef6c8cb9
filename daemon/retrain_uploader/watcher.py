"""Finds settled files in an inbox and pairs them into candidates.

File-system events are only hints that wake the scanner: every decision is made from a fresh ``lstat`` of the
inbox's top level, at start, on each event, at each settle deadline and on a periodic rescan (inotify can overflow,
watchfiles can drop events, network mounts send none). The events come from one watch over every inbox
(:class:`~.watchhub.WatchHub`), kept alive there: when it fails (a name that is not UTF-8 ends watchfiles' iterator)
or an inbox is replaced (removed and made again), it is set up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from .config import WatchSettings
from .watchhub import WatchHub, is_ignored

__all__ = [
    "DONE_DIR",
    "FAILED_DIR",
    "OWN_FOLDERS",
    "Candidate",
    "InboxWatcher",
    "Plan",
    "Reject",
    "SettleTracker",
    "Signature",
    "is_ignored",
    "plan",
    "printable_name",
]

log = structlog.get_logger("retrain_uploader.watcher")

DONE_DIR = "done"
FAILED_DIR = "failed"
# The daemon's own folders: at the inbox's top level these names are never files to take or reject, whatever they
# are (a folder, or a symbolic link to an archive folder elsewhere).
OWN_FOLDERS = frozenset({DONE_DIR, FAILED_DIR})
_MAX_NAME_BYTES = 200  # leaves room for ".error.json" and a collision suffix within the usual 255-byte limit

_T = TypeVar("_T")
Signature = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device


@dataclass(frozen=True, slots=True)
class Candidate:
    kind: str  # "csv" | "pair" | "zip"
    name: str  # the stem: NAME
    sources: tuple[str, ...]  # file names, train before eval for a pair
    upload_filename: str


@dataclass(frozen=True, slots=True)
class Reject:
    name: str  # as the OS gave it: a name that is not UTF-8 holds surrogates (see ``printable_name``)
    reason: str
    signature: Signature | None = field(default=None, compare=False)  # its lstat, when the scan made it


@dataclass(frozen=True, slots=True)
class Plan:
    candidates: tuple[Candidate, ...] = ()
    halves: tuple[str, ...] = ()  # one side of a pair, waiting for its partner
    rejects: tuple[Reject, ...] = ()


def printable_name(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that are not UTF-8 (surrogates in ``name``) shown as ``\\xff`` escapes.

    For the ledger, logs and reports; the file itself is still reached by ``name`` (``os.fsencode`` gives its bytes).
    """
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _name_problem(name: str) -> str | None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 come as surrogates, which are not printable either
        return "its name is not valid UTF-8; rename it and drop it again"
    if any(not ch.isprintable() for ch in name):
        return "its name contains control characters (such as a newline); rename it and drop it again"
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        return f"its name is longer than {_MAX_NAME_BYTES} bytes; rename it shorter and drop it again"
    return None


def plan(names: Iterable[str]) -> Plan:
    """Turn settled regular-file names into upload candidates (pure; the order of ``names`` does not matter)."""
    candidates: list[Candidate] = []
    rejects: list[Reject] = []
    trains: dict[str, str] = {}
    evals: dict[str, str] = {}
    for name in sorted(set(names)):
        if is_ignored(name):
            continue
        problem = _name_problem(name)
        if problem is not None:
            rejects.append(Reject(name, problem))
            continue
        lower = name.lower()
        if lower.endswith(".train.csv"):
            trains[name[: -len(".train.csv")]] = name
        elif lower.endswith(".eval.csv"):
            evals[name[: -len(".eval.csv")]] = name
        elif lower.endswith(".csv") and len(name) > 4:
            candidates.append(Candidate("csv", name[:-4], (name,), name))
        elif lower.endswith(".zip") and len(name) > 4:
            candidates.append(Candidate("zip", name[:-4], (name,), name))
        else:
            reason = "not a supported file: drop NAME.csv, a NAME.train.csv + NAME.eval.csv pair, or NAME.zip"
            rejects.append(Reject(name, reason))
    halves: list[str] = []
    for stem in sorted(trains.keys() | evals.keys()):
        if stem in trains and stem in evals:
            candidates.append(Candidate("pair", stem, (trains[stem], evals[stem]), f"{stem}.zip"))
        else:
            halves.append(trains.get(stem) or evals[stem])
    candidates.sort(key=lambda c: c.sources)
    return Plan(tuple(candidates), tuple(halves), tuple(rejects))


@dataclass(slots=True)
class SettleTracker:
    """A file is settled once its signature has not changed for ``settle_s`` on our own monotonic clock.

    The daemon's clock, not the file's mtime: copy tools that preserve an old mtime still change size and ctime
    while they write, and a file is only taken after a quiet period that we measured ourselves.
    """

    settle_s: float
    _seen: dict[str, tuple[Signature, float]] = field(default_factory=dict)
    _unsettled: set[str] = field(default_factory=set)  # the names the last scan found not settled yet

    def observe(self, entries: Mapping[str, Signature], now: float) -> set[str]:
        """Record a scan; return the names that are settled now."""
        for gone in self._seen.keys() - entries.keys():
            del self._seen[gone]
        settled: set[str] = set()
        unsettled: set[str] = set()
        for name, sig in entries.items():
            previous = self._seen.get(name)
            if previous is None or previous[0] != sig:
                self._seen[name] = (sig, now)
                since = now
            else:
                since = previous[1]
            (settled if now - since >= self.settle_s else unsettled).add(name)
        self._unsettled = unsettled
        return settled

    def next_due(self, now: float) -> float | None:
        """Seconds until the next file the last scan found unsettled settles (0: it has by now, scan again), or None
        when that scan found every file settled.

        By those names, not by the time: a file that settled after the scan (the loop held up for longer than
        settle_s between the scan and this call) was never offered, and "every file is settled" left it to the
        periodic rescan, a minute later (found timing a drop of 1,000 files right after start)."""
        waits = [self._seen[name][1] + self.settle_s - now for name in self._unsettled if name in self._seen]
        return max(min(waits), 0.0) if waits else None

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)
        self._unsettled.discard(name)


# Candidates handed over between two yields to the loop: the service records them in one commit.
_BURST = 32


def scan(
    inbox: Path, taken: Callable[[str], bool] | None = None, held: set[str] | None = None
) -> tuple[dict[str, Signature], list[Reject]]:
    """``lstat`` the inbox's top level: regular files with their signatures, and entries that cannot be taken.

    Names for which ``taken`` is true belong to a job already: they are not ``lstat``-ed (each job's close wakes a
    scan of an inbox that may hold thousands of them) but added to ``held``.
    """
    files: dict[str, Signature] = {}
    rejects: list[Reject] = []
    with os.scandir(inbox) as it:
        for entry in it:
            name = entry.name
            if taken is not None and taken(name):  # first: cheaper than is_ignored, and most names of a backlog
                if held is not None:
                    held.add(name)
                continue
            if is_ignored(name) or name in OWN_FOLDERS:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            mode = st.st_mode
            if stat.S_ISREG(mode):
                files[name] = _signature(st)
            elif stat.S_ISDIR(mode):
                continue  # done/, failed/ and the user's own folders: only the top level is an inbox
            elif stat.S_ISLNK(mode):
                reason = "it is a symbolic link, which is never followed; copy the file in instead"
                rejects.append(Reject(name, reason, _signature(st)))
            else:
                reason = "it is not a regular file (a FIFO, socket or device); copy a file in"
                rejects.append(Reject(name, reason, _signature(st)))
    return files, rejects


def _signature(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class InboxWatcher:
    """Watches one model's inbox and hands each settled candidate (once) to ``on_candidate``.

    ``is_taken(name)`` tells which names already belong to a job, so a file is never taken twice. A rejected entry
    is handed to ``on_reject`` once while it stays the same entry (same ``lstat`` signature), even when moving it
    out failed: a new job at every scan would only repeat the same failure. Its events come from ``hub`` (the
    daemon's one watch over every inbox), or from a watch of its own when there is none.
    """

    def __init__(
        self,
        model: str,
        inbox: Path,
        settings: WatchSettings,
        *,
        on_candidate: Callable[[Candidate], Awaitable[None]],
        on_reject: Callable[[Reject], Awaitable[None]],
        is_taken: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
        rewatch_base_s: float = 0.05,
        hub: WatchHub | None = None,
    ) -> None:
        self.model = model
        self.inbox = inbox
        self.settings = settings
        self._on_candidate = on_candidate
        self._on_reject = on_reject
        self._is_taken = is_taken
        self._clock = clock
        self._rewatch_base_s = rewatch_base_s
        self._hub = hub
        self._active_hub: WatchHub | None = None  # the hub it is registered with while it runs
        self._tracker = SettleTracker(settings.settle_s)
        self._wake = asyncio.Event()
        self._warned_halves: set[str] = set()
        self._rejected: dict[str, Signature | None] = {}
        self._scan_failed = False

    @property
    def inbox_path(self) -> str:
        return str(self.inbox)

    def poke(self) -> None:
        """Scan again soon (an event arrived, or a file was released)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        hub = self._hub
        own: asyncio.Task[None] | None = None
        if hub is None:  # on its own (a test, a tool): a watch of its own
            hub = WatchHub(self.settings, clock=self._clock, rewatch_base_s=self._rewatch_base_s)
            own = asyncio.create_task(hub.run(stop), name=f"watch-events-{self.model}")
        self._active_hub = hub
        hub.add(self)
        # Let the hub set up its watch before the first scan: a file dropped between the scan and the watch would
        # otherwise wait for the periodic rescan (the hub also wakes every inbox once its watch is up).
        await asyncio.sleep(0)
        try:
            while not stop.is_set():
                self._wake.clear()
                await self.scan_once()
                timeout = self.settings.rescan_s
                if self._scan_failed:  # the inbox is gone: look for it again soon, to watch it again once it is back
                    timeout = min(timeout, max(1.0, self.settings.settle_s))
                due = self._tracker.next_due(self._clock())
                if due is not None:
                    timeout = min(timeout, due + 0.01)
                waiter = asyncio.create_task(self._wake.wait())
                stopper = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
        finally:
            hub.remove(self)
            self._active_hub = None
            if own is not None:
                own.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await own

    async def scan_once(self) -> None:
        if self._active_hub is not None:
            self._active_hub.check(self.inbox_path)
        try:
            held: set[str] = set()
            files, rejects = scan(self.inbox, self._is_taken, held)
        except OSError as e:
            if not self._scan_failed:
                log.error("inbox.unreadable", model=self.model, inbox=str(self.inbox), error=str(e))
            self._scan_failed = True
            return
        self._scan_failed = False
        free = {name: sig for name, sig in files.items() if not self._is_taken(name)}
        settled = self._tracker.observe(free, self._clock())
        result = plan(settled)
        present = files.keys() | {r.name for r in rejects} | held
        self._rejected = {name: sig for name, sig in self._rejected.items() if name in present}
        for reject in (*rejects, *result.rejects):
            identity = reject.signature or files.get(reject.name)
            if self._is_taken(reject.name) or self._rejected.get(reject.name, ()) == identity:
                continue
            self._rejected[reject.name] = identity
            if not await self._hand_over(self._on_reject, reject, printable_name(reject.name)):
                del self._rejected[reject.name]  # not recorded (the ledger's disk full): offered again next scan
        for half in result.halves:
            if half not in self._warned_halves:
                self._warned_halves.add(half)
                log.warning("inbox.waiting_for_partner", model=self.model, file=half)
        self._warned_halves &= set(result.halves)
        for i, candidate in enumerate(result.candidates, 1):
            for name in candidate.sources:
                self._tracker.forget(name)
            await self._hand_over(self._on_candidate, candidate, candidate.upload_filename, pause=i % _BURST == 0)

    async def _hand_over(
        self, handler: Callable[[_T], Awaitable[None]], item: _T, file: str, *, pause: bool = True
    ) -> bool:
        # A failure to record one file (disk full under the ledger, say) must not end the watch: the file stays in
        # the inbox, settles again and is offered again. Returns whether the handler took it.
        try:
            await handler(item)
        except Exception:
            log.exception("inbox.take_failed", model=self.model, file=file)
            return False
        finally:
            if pause:
                # Let the loop run between takes of a burst of a thousand: the service records each run of takes in
                # one commit and its workers start on the first files.
                await asyncio.sleep(0)
        return True
