"""The ledger's history for people: the jobs table, one job's story, and ``--since`` times.

Terminal columns are measured in display cells, not characters: an East Asian wide character (来店予測.csv) takes two.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .ledger import Job

__all__ = ["DEFAULT_LISTING", "display_width", "job_document", "job_story", "job_table", "parse_since"]

DEFAULT_LISTING = 50  # rows of the human listing unless --limit or --since says otherwise
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_COLUMNS = ("id", "model", "state", "upload_filename", "retrain_job_id", "updated_at")


def parse_since(text: str, now: float | None = None) -> float:
    """A POSIX time from a duration back from now (``90m``, ``2h``, ``7d``, ``1h30m``) or a date (``2026-12-01``,
    ``2026-12-01T10:00``; local time unless it names a zone). Raises ValueError with what it expects."""
    value = text.strip()
    if _DURATION.fullmatch(value):
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value))
        return (time.time() if now is None else now) - seconds
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        msg = f"{text!r}: expected a duration (90m, 2h, 7d, 1w, 1h30m) or a date (2026-12-01, 2026-12-01T10:00)"
        raise ValueError(msg) from None
    if when.tzinfo is None:
        when = when.astimezone()  # the operator's local time
    return when.timestamp()


def display_width(text: str) -> int:
    """Cells ``text`` takes in a terminal: wide and fullwidth characters two, combining marks none."""
    width = 0
    for char in text:
        if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def _cell(text: str) -> str:
    # A newline or tab in a file name would break the table; a lone surrogate (a name not in UTF-8) cannot be
    # printed: both are shown as escapes.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _pad(text: str, width: int, *, right: bool = False) -> str:
    fill = " " * max(0, width - display_width(text))
    return fill + text if right else text + fill


def job_table(jobs: Sequence[Job], left_out: int = 0) -> list[str]:
    """The jobs as aligned text lines (a header first), and a last line saying how many older jobs were left out."""
    if not jobs:
        return [f"({left_out} older job(s) not shown; use --limit N or --since)"] if left_out else []
    rows: list[list[str]] = [list(_COLUMNS)]
    notes: list[str] = [""]
    for job in jobs:
        rows.append(
            [str(job.id), job.model, str(job.state), _cell(job.upload_filename), job.retrain_job_id or "-",
             job.updated_at]
        )
        note = f"  {_cell(job.error)}" if job.error else ""
        if job.outcome_unknown_since:
            note = f"  upload outcome unknown since {job.outcome_unknown_since}, asking the status check{note}"
        notes.append(note)
    widths = [max(display_width(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = []
    for row, note in zip(rows, notes, strict=True):
        cells = [_pad(row[0], widths[0], right=True)] + [_pad(c, w) for c, w in zip(row[1:-1], widths[1:], strict=True)]
        lines.append(("  ".join([*cells, row[-1]]) + note).rstrip())
    if left_out:
        lines.append(f"({left_out} older job(s) not shown; use --limit N or --since)")
    return lines


def job_document(job: Job, events: list[dict[str, Any]]) -> dict[str, Any]:
    """``jobs show --json``: the job's fields and every event of it (``at``, ``event``, ``detail``) in order."""
    return {**job.as_dict(), "inbox": job.inbox, "closed": job.closed, "events": events}


def job_story(job: Job, events: list[dict[str, Any]]) -> list[str]:
    """``jobs show``: the job, then every event of it in order, one line each."""
    ids = [e["detail"]["retrain_job_id"] for e in events if isinstance(e["detail"], dict)
           and e["detail"].get("retrain_job_id")]
    abandoned = [i for i in dict.fromkeys(ids) if i != job.retrain_job_id]
    facts = [
        ("file", _cell(job.upload_filename)),
        ("sources", ", ".join(_cell(s) for s in job.sources)),
        ("state", str(job.state) + ("" if job.closed else " (its files are not moved out yet)")),
        ("retrain job", job.retrain_job_id or "-"),
        ("abandoned retrain jobs", ", ".join(abandoned)),
        ("size", f"{job.size_bytes} bytes" if job.size_bytes is not None else ""),
        ("sha256", job.sha256 or ""),
        ("attempts", str(job.attempts)),
        ("error", _cell(job.error or "")),
        ("outcome unknown since", job.outcome_unknown_since or ""),
        ("retrain status", " ".join(filter(None, [job.retrain_status, job.retrain_message]))),
        ("moved to", ", ".join(_cell(m) for m in job.moved_to)),
        ("created", job.created_at),
        ("updated", job.updated_at),
    ]
    label = max(display_width(k) for k, _ in facts) + 1
    lines = [f"job {job.id}  model {job.model}"]
    lines += [f"  {_pad(k + ':', label)} {v}" for k, v in facts if v]
    lines.append(f"events ({len(events)}):")
    width = max((display_width(e["event"]) for e in events), default=0)
    for e in events:
        lines.append(f"  {e['at']}  {_pad(_cell(e['event']), width)}  {_detail(e['detail'])}".rstrip())
    return lines


def _detail(detail: Any) -> str:
    if isinstance(detail, dict):
        return " ".join(
            f"{k}={_cell(v) if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}"
            for k, v in detail.items()
            if v is not None
        )
    return "" if detail is None else _cell(json.dumps(detail, ensure_ascii=False))
