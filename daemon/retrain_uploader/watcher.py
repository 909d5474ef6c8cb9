"""Finds settled files in an inbox and pairs them into candidates.

File-system events are only hints that wake the scanner: every decision is made from a fresh ``lstat`` of the
inbox's top level, at start, on each event, at each settle deadline and on a periodic rescan (inotify can overflow,
watchfiles can drop events, network mounts send none). The event watch itself is kept alive: when it fails (a name
that is not UTF-8 ends watchfiles' iterator) or its folder is replaced (removed and made again), it is set up again.
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
import watchfiles

from .config import WatchSettings
from .policy import backoff_delay

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
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")
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


def is_ignored(name: str) -> bool:
    """Hidden files and the temporary names that copy tools and editors use."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


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

    def observe(self, entries: Mapping[str, Signature], now: float) -> set[str]:
        """Record a scan; return the names that are settled now."""
        for gone in self._seen.keys() - entries.keys():
            del self._seen[gone]
        settled: set[str] = set()
        for name, sig in entries.items():
            previous = self._seen.get(name)
            if previous is None or previous[0] != sig:
                self._seen[name] = (sig, now)
                since = now
            else:
                since = previous[1]
            if now - since >= self.settle_s:
                settled.add(name)
        return settled

    def next_due(self, now: float) -> float | None:
        """Seconds until the next unsettled file could settle, or None when every file is settled."""
        waits = [since + self.settle_s - now for _, since in self._seen.values() if now - since < self.settle_s]
        return max(min(waits), 0.0) if waits else None

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)


def scan(inbox: Path) -> tuple[dict[str, Signature], list[Reject]]:
    """``lstat`` the inbox's top level: regular files with their signatures, and entries that cannot be taken."""
    files: dict[str, Signature] = {}
    rejects: list[Reject] = []
    with os.scandir(inbox) as it:
        for entry in it:
            name = entry.name
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


class _WatchStop:
    """Ends one watchfiles iterator: when the daemon stops, or to set the watch up again (``set``).

    watchfiles asks ``is_set()`` from its own thread, every ``step`` ms.
    """

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._again = False

    def is_set(self) -> bool:
        return self._again or self._stop.is_set()

    def set(self) -> None:
        self._again = True


def _folder_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _describe(error: BaseException) -> str:
    # watchfiles raises from inside an anyio task group: name the real errors, not "unhandled errors in a TaskGroup".
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in error.exceptions)
    return f"{type(error).__name__}: {error}"


class InboxWatcher:
    """Watches one model's inbox and hands each settled candidate (once) to ``on_candidate``.

    ``is_taken(name)`` tells which names already belong to a job, so a file is never taken twice. A rejected entry
    is handed to ``on_reject`` once while it stays the same entry (same ``lstat`` signature), even when moving it
    out failed: a new job at every scan would only repeat the same failure.
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
    ) -> None:
        self.model = model
        self.inbox = inbox
        self.settings = settings
        self._on_candidate = on_candidate
        self._on_reject = on_reject
        self._is_taken = is_taken
        self._clock = clock
        self._rewatch_base_s = rewatch_base_s
        self._tracker = SettleTracker(settings.settle_s)
        self._wake = asyncio.Event()
        self._warned_halves: set[str] = set()
        self._rejected: dict[str, Signature | None] = {}
        self._scan_failed = False
        self._watch: _WatchStop | None = None
        self._watched: tuple[int, int] | None = None  # the folder the event watch is set up on
        self._watch_warned_at = -1e9

    def poke(self) -> None:
        """Scan again soon (an event arrived, or a file was released)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        events = asyncio.create_task(self._events(stop), name=f"watch-events-{self.model}")
        # Let the events task set up the inotify watch before the first scan: a file dropped between the scan and
        # the watch would otherwise wait for the periodic rescan.
        await asyncio.sleep(0)
        try:
            while not stop.is_set():
                self._wake.clear()
                await self.scan_once()
                timeout = self.settings.rescan_s
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
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events

    async def scan_once(self) -> None:
        self._check_watched()
        try:
            files, rejects = scan(self.inbox)
        except OSError as e:
            if not self._scan_failed:
                log.error("inbox.unreadable", model=self.model, inbox=str(self.inbox), error=str(e))
            self._scan_failed = True
            return
        self._scan_failed = False
        free = {name: sig for name, sig in files.items() if not self._is_taken(name)}
        settled = self._tracker.observe(free, self._clock())
        result = plan(settled)
        present = files.keys() | {r.name for r in rejects}
        self._rejected = {name: sig for name, sig in self._rejected.items() if name in present}
        for reject in (*rejects, *result.rejects):
            identity = reject.signature or files.get(reject.name)
            if self._is_taken(reject.name) or self._rejected.get(reject.name, ()) == identity:
                continue
            self._rejected[reject.name] = identity
            await self._hand_over(self._on_reject, reject, printable_name(reject.name))
        for half in result.halves:
            if half not in self._warned_halves:
                self._warned_halves.add(half)
                log.warning("inbox.waiting_for_partner", model=self.model, file=half)
        self._warned_halves &= set(result.halves)
        for candidate in result.candidates:
            for name in candidate.sources:
                self._tracker.forget(name)
            await self._hand_over(self._on_candidate, candidate, candidate.upload_filename)

    async def _hand_over(self, handler: Callable[[_T], Awaitable[None]], item: _T, file: str) -> None:
        # A failure to record one file (disk full under the ledger, say) must not end the watch: the file stays in
        # the inbox, settles again and is offered again.
        try:
            await handler(item)
        except Exception:
            log.exception("inbox.take_failed", model=self.model, file=file)
        # Each take commits to the ledger: let workers start on the first files of a burst of a thousand.
        await asyncio.sleep(0)

    def _check_watched(self) -> None:
        # An inbox removed (or renamed away) and made again is another folder: the old watch sees nothing of it.
        watch = self._watch
        if watch is not None and _folder_identity(self.inbox) != self._watched:
            watch.set()

    async def _events(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            watch = self._watch = _WatchStop(stop)
            self._watched = _folder_identity(self.inbox)
            started = self._clock()
            # A new watch saw nothing of what happened before it: scan once it is set up (watchfiles sets it up
            # before its first await, so the scanner runs after that).
            self._wake.set()
            try:
                async for _ in watchfiles.awatch(
                    self.inbox,
                    stop_event=watch,
                    recursive=False,
                    debounce=50,
                    step=20,
                    force_polling=self.settings.force_polling,
                    poll_delay_ms=self.settings.poll_delay_ms,
                    watch_filter=None,
                    ignore_permission_denied=True,
                ):
                    failures = 0
                    self._wake.set()
                    self._check_watched()
            except Exception as e:
                # Any error ends watchfiles' iterator (a name that is not UTF-8 does, from its thread, wrapped in an
                # ExceptionGroup). The periodic rescan still finds everything; set the watch up again soon.
                if self._clock() - started > self.settings.rescan_s:
                    failures = 0
                failures += 1
                # Capped low: while the watch is down only the rescan sees drops, and a file that keeps failing the
                # watch (a changing name that is not UTF-8, even an ignored one) must not make every drop wait.
                cap = min(self.settings.rescan_s, max(1.0, self.settings.settle_s))
                delay = backoff_delay(failures, base_s=self._rewatch_base_s, max_s=cap)
                now = self._clock()
                if failures == 1 or now - self._watch_warned_at >= 60.0:  # a streak: one line a minute, not a second
                    self._watch_warned_at = now
                    log.warning(
                        "inbox.watch_failed",
                        model=self.model,
                        error=_describe(e),
                        retry_in_s=round(delay, 3),
                        failures_in_a_row=failures,
                    )
                self._wake.set()  # what the failed watch would have reported is lost
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
            else:
                if not stop.is_set():
                    log.info("inbox.rewatched", model=self.model, inbox=str(self.inbox))
        self._watch = None
