"""One event watch over every inbox: a single inotify instance (one fd, one thread) however many models there are.

watchfiles' ``awatch`` takes a fixed list of folders, so a change to that list (a model added or removed, an inbox
removed and made again) restarts the one watch with the new list; every inbox is scanned once after each restart,
because a new watch saw nothing of what happened before it. Events only wake the inbox they belong to: the scan
decides. Inboxes beyond ``event_slots`` (when the inotify limits cannot hold them all) are watched by a second,
polling watch instead; so is every inbox once the event watch cannot be set up for lack of fds or inotify room.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog
import watchfiles

from .config import WatchSettings
from .policy import backoff_delay

__all__ = ["IGNORED_SUFFIXES", "WatchHub", "Watched", "folder_identity", "is_ignored", "is_limit_error"]

log = structlog.get_logger("retrain_uploader.watcher")

_LIMIT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC})
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
EVENTS, POLLING = "events", "polling"


class Watched(Protocol):
    """What the hub needs of an inbox's watcher: its folder, and a way to make it scan soon."""

    @property
    def inbox_path(self) -> str: ...

    def poke(self) -> None: ...


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


IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")


def is_ignored(name: str) -> bool:
    """Hidden files and the temporary names that copy tools and editors use."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def folder_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def is_limit_error(error: BaseException) -> bool:
    """An fd or inotify limit (EMFILE, ENFILE, ENOSPC: "no space" is inotify's word for "no watches left").

    watchfiles reports a failed ``inotify_init`` as ``WatchfilesRustInternalError`` whose text ends in
    "(os error 24)", not as an OSError: that is read too (found with a real limit of 0 instances)."""
    if isinstance(error, BaseExceptionGroup):
        return any(is_limit_error(e) for e in error.exceptions)
    if isinstance(error, OSError):
        return error.errno in _LIMIT_ERRNOS
    code = _RUST_OS_ERROR.search(str(error))
    return code is not None and int(code.group(1)) in _LIMIT_ERRNOS


def _describe(error: BaseException) -> str:
    # watchfiles raises from inside an anyio task group: name the real errors, not "unhandled errors in a TaskGroup".
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in error.exceptions)
    return f"{type(error).__name__}: {error}"


class WatchHub:
    """Routes the events of one watch over every registered inbox to the watchers of those inboxes."""

    def __init__(
        self,
        settings: WatchSettings,
        *,
        event_slots: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        rewatch_base_s: float = 0.05,
    ) -> None:
        self.settings = settings
        self.event_slots = event_slots  # None: every inbox gets events
        self._clock = clock
        self._rewatch_base_s = rewatch_base_s
        self._by_path: dict[str, list[Watched]] = {}
        self._watches: dict[str, _WatchStop] = {}
        self._identities: dict[str, dict[str, tuple[int, int] | None]] = {EVENTS: {}, POLLING: {}}
        self._changed = {EVENTS: asyncio.Event(), POLLING: asyncio.Event()}
        self._events_failed = False  # the event watch cannot be set up (limits): every inbox is polled

    # -- membership ---------------------------------------------------------------------------------------------------
    def add(self, watched: Watched) -> None:
        path = watched.inbox_path
        members = self._by_path.setdefault(path, [])
        members.append(watched)
        if len(members) == 1:
            self._membership_changed(path)

    def remove(self, watched: Watched) -> None:
        path = watched.inbox_path
        members = [w for w in self._by_path.get(path, []) if w is not watched]
        if members:
            self._by_path[path] = members
        elif path in self._by_path:
            self._membership_changed(path)
            del self._by_path[path]

    def _membership_changed(self, path: str) -> None:
        if self.event_slots is None:
            self._restart(self._group_of(path))
        else:  # an inbox more or less may move another one between the event watch and the polling one
            self._restart(EVENTS)
            self._restart(POLLING)

    def apply(self, settings: WatchSettings) -> None:
        """New ``[watch]`` settings (a reload): both watches are set up again with them."""
        if settings != self.settings:
            self.settings = settings
            self._restart(EVENTS)
            self._restart(POLLING)

    def check(self, path: str) -> None:
        """An inbox removed (or renamed away) and made again is another folder: the old watch sees nothing of it."""
        group = self._group_of(path)
        known = self._identities[group]
        if path in known and folder_identity(path) != known[path]:
            self._restart(group)

    def mode(self, path: str) -> str:
        return self._group_of(path)

    def _group_of(self, path: str) -> str:
        if self._events_failed or self.settings.force_polling:
            return POLLING
        if self.event_slots is None:
            return EVENTS
        return EVENTS if path in sorted(self._by_path)[: self.event_slots] else POLLING

    def _paths(self, group: str) -> list[str]:
        return sorted(p for p in self._by_path if self._group_of(p) == group)

    def _restart(self, group: str) -> None:
        self._changed[group].set()
        watch = self._watches.get(group)
        if watch is not None:
            watch.set()

    def _route(self, changes: Iterable[tuple[watchfiles.Change, str]]) -> None:
        woken: set[str] = set()
        for change, changed in changes:
            if os.path.dirname(changed) in self._by_path and (
                change == watchfiles.Change.deleted or is_ignored(os.path.basename(changed))
            ):
                # A file gone from an inbox (most often a job's own move to done/), or a hidden or temporary one (a
                # copy tool's name before its rename, the closer's take of a source) brings nothing to take: no scan
                # (each one reads the whole inbox, and a backlog of thousands closes one job at a time).
                continue
            for path in (os.path.dirname(changed), changed):  # a file in an inbox, or the inbox itself
                if path in self._by_path:
                    woken.add(path)
                    break
            else:  # a path we cannot place: wake everyone rather than miss a file
                woken.update(self._by_path)
        for path in woken:
            self.poke(path)

    def poke(self, path: str) -> None:
        """Wake the watchers of the inbox at ``path`` (a scan soon), as an event in it would."""
        for watched in self._by_path.get(path, ()):
            watched.poke()

    # -- the watches --------------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._run_group(EVENTS, stop), name="watch-events")
            group.create_task(self._run_group(POLLING, stop), name="watch-polling")

    async def _run_group(self, group: str, stop: asyncio.Event) -> None:
        failures = 0
        warned_at = -1e9
        while not stop.is_set():
            self._changed[group].clear()
            paths = self._paths(group)
            self._identities[group] = {p: folder_identity(p) for p in paths}
            present = [p for p in paths if self._identities[group][p] is not None]
            if not present:  # nothing to watch (yet): wait for a member, or for a missing inbox to be made again
                self._watches.pop(group, None)
                waiter = asyncio.create_task(self._changed[group].wait())
                stopper = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
                continue
            watch = self._watches[group] = _WatchStop(stop)
            started = self._clock()
            # A new watch saw nothing of what happened before it: scan every inbox once it is set up (watchfiles
            # sets it up before its first await, so the scanners run after that).
            for path in paths:
                self.poke(path)
            try:
                async for changes in watchfiles.awatch(
                    *present,
                    stop_event=watch,
                    recursive=False,
                    debounce=50,
                    step=20,
                    force_polling=group == POLLING,
                    poll_delay_ms=self.settings.poll_delay_ms,
                    watch_filter=None,
                    ignore_permission_denied=True,
                ):
                    failures = 0
                    self._route(changes)
            except Exception as e:
                if group == EVENTS and is_limit_error(e):
                    self._fall_back(e, len(present))
                    continue
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
                # One line a minute, not one per failure: a watch that comes back between failures (it delivered the
                # drops' events, so `failures` starts again) is the same trouble, not a new one to announce (a name
                # that is not UTF-8 changing every 50 ms logged 4 lines in 2 s, found by CI).
                if now - warned_at >= 60.0:
                    warned_at = now
                    log.warning(
                        "inbox.watch_failed",
                        mode=group,
                        inboxes=len(present),
                        error=_describe(e),
                        retry_in_s=round(delay, 3),
                        failures_in_a_row=failures,
                    )
                for path in paths:  # what the failed watch would have reported is lost
                    self.poke(path)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
            else:
                if not stop.is_set():
                    log.debug("inbox.rewatched", mode=group, inboxes=len(self._paths(group)))
        self._watches.pop(group, None)

    def _fall_back(self, error: BaseException, inboxes: int) -> None:
        # Never silent: the files are still taken (by polling, within poll_delay_ms), and the line says what to raise.
        self._events_failed = True
        log.error(
            "watch.limit_reached",
            error=_describe(error),
            inboxes=inboxes,
            action="polling every inbox instead of inotify events",
            fix="raise LimitNOFILE= in the unit, or sysctl fs.inotify.max_user_instances / max_user_watches",
        )
        self._restart(POLLING)
