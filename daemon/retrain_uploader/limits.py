"""The host's limits against what the config needs: open files (RLIMIT_NOFILE) and inotify watches.

Read once at start. One inotify instance watches every inbox, so models cost watches, not fds; fds grow with the
workers and the status polls in flight. What does not fit is said once, with the setting that fixes it, and the
daemon falls back (inboxes beyond the watches left are polled) instead of failing silently.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import structlog

__all__ = ["Limits", "Plan", "apply", "fds_needed", "plan", "read_limits"]

log = structlog.get_logger("retrain_uploader.limits")

INOTIFY = Path("/proc/sys/fs/inotify")
_BASE_FDS = 48  # the interpreter, the ledger (db, WAL, shm), the event loop, logs, metrics, one inbox scan at a time
_WATCH_MARGIN = 64  # watches other programs of the same user may hold (max_user_watches is per user)


@dataclass(frozen=True, slots=True)
class Limits:
    fd_soft: int
    fd_hard: int
    max_user_instances: int | None  # None: not readable (not Linux, or /proc hidden)
    max_user_watches: int | None


@dataclass(frozen=True, slots=True)
class Plan:
    raise_soft_to: int | None  # lift the soft fd limit to this (never above the hard one)
    event_slots: int | None  # inboxes that get inotify events; None: all of them
    problems: tuple[tuple[str, dict[str, object]], ...]  # (log event, fields), each said once


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_limits(inotify: Path = INOTIFY) -> Limits:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return Limits(
        fd_soft=soft,
        fd_hard=hard,
        max_user_instances=_read_int(inotify / "max_user_instances"),
        max_user_watches=_read_int(inotify / "max_user_watches"),
    )


def fds_needed(*, workers: int, polls: int) -> int:
    """Open files the daemon may hold at once: an upload holds its file and a socket, a status poll a socket (and a
    result download a file)."""
    return _BASE_FDS + 2 * workers + 2 * polls


def plan(limits: Limits, *, inboxes: int, workers: int, polls: int, force_polling: bool = False) -> Plan:
    """What to do about ``limits`` for ``inboxes`` watched, ``workers`` uploads and ``polls`` status checks (pure)."""
    problems: list[tuple[str, dict[str, object]]] = []
    needed = fds_needed(workers=workers, polls=polls)
    raise_to: int | None = None
    if limits.fd_soft < needed:
        unlimited = limits.fd_hard == resource.RLIM_INFINITY
        raise_to = needed if unlimited else min(needed, limits.fd_hard)
        if raise_to < needed:
            problems.append(
                (
                    "limits.fds_low",
                    {
                        "limit": limits.fd_hard,
                        "needed": needed,
                        "action": "uploads and status checks may fail with 'Too many open files' and be retried",
                        "fix": f"LimitNOFILE={max(needed, 4096)} in the unit (or ulimit -n), or fewer workers",
                    },
                )
            )
    slots: int | None = None
    if not force_polling and inboxes:
        if limits.max_user_instances is not None and limits.max_user_instances < 1:
            slots = 0
            problems.append(
                (
                    "limits.inotify_instances_low",
                    {
                        "limit": limits.max_user_instances,
                        "needed": 1,
                        "action": "polling every inbox",
                        "fix": "sysctl -w fs.inotify.max_user_instances=512",
                    },
                )
            )
        elif limits.max_user_watches is not None and limits.max_user_watches < inboxes + _WATCH_MARGIN:
            slots = max(0, limits.max_user_watches - _WATCH_MARGIN)
            problems.append(
                (
                    "limits.inotify_watches_low",
                    {
                        "limit": limits.max_user_watches,
                        "needed": inboxes + _WATCH_MARGIN,
                        "event_watched": slots,
                        "polled": inboxes - slots,
                        "action": "the inboxes beyond the limit are polled (poll_delay_ms) instead of watched",
                        "fix": f"sysctl -w fs.inotify.max_user_watches={max(8192, 2 * (inboxes + _WATCH_MARGIN))}",
                    },
                )
            )
    return Plan(raise_to, slots, tuple(problems))


def apply(result: Plan) -> None:
    """Lift the soft fd limit as planned, and say each problem once."""
    if result.raise_soft_to is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (result.raise_soft_to, hard))
        except (OSError, ValueError) as e:
            log.warning("limits.fds_not_raised", wanted=result.raise_soft_to, error=str(e))
    for event, fields in result.problems:
        log.warning(event, **fields)
