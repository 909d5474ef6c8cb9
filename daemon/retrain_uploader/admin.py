"""Operator commands that work beside a running daemon: status report, retry of a failed job, model switch,
online key check. They open the ledger without its lock (WAL lets readers and one writer share it)."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .bandwidth import CLOSED, Timetable, describe_rate
from .client import ApiError, Client, ProxyAuthFailed, TransportError
from .config import ConfigError, Settings
from .ledger import Ledger, StaleJob, State, iso
from .mover import rename_no_replace
from .network import Network
from .policy import is_credential_error
from .tracker import NOT_FINISHED_MESSAGE
from .watcher import OWN_FOLDERS, is_ignored, printable_name

__all__ = [
    "CRITICAL",
    "OK",
    "PROBE_JOB_ID",
    "UNKNOWN",
    "WARNING",
    "check_keys_online",
    "collect",
    "failed_recently",
    "health",
    "render",
    "retry_job",
    "switch_job",
    "unknown",
    "waiting_files",
    "window_text",
]

# A job id that cannot exist: asking its status proves a key without creating a retrain job.
PROBE_JOB_ID = "retrain-uploader-key-check-0"
_WAITING = (State.QUEUED, State.PACKAGING, State.REQUESTING, State.UPLOADING)
# Monitoring-plugin exit codes (Nagios, Icinga, Sensu, Checkmk all read these).
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_LABELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
FAILED_WINDOW_S = 24 * 3600
# A job ended in one of these is a failure an operator should look at: the upload failed, or the retraining did.
_FAILED = (State.FAILED, State.RETRAIN_FAILED, State.RETRAIN_TIMEOUT)


def collect(settings: Settings, ledger: Ledger | None, *, now: datetime | None = None) -> dict[str, Any]:
    """Per model: inbox, files waiting, jobs per state, pause, last success and last error; the upload window."""
    counts = ledger.counts() if ledger else {}
    models_row = ledger.models() if ledger else {}
    out: dict[str, Any] = {"ledger": str(settings.ledger.path), "models": []}
    if settings.upload.schedule or settings.upload.max_bytes_per_s is not None:
        out["upload_window"] = _window(settings.upload.timetable(), now or datetime.now(UTC))
    for model in settings.models:
        row = models_row.get(model.name, {})
        waiting, oldest = waiting_files(model.inbox)
        last_failed = None
        unknown: list[dict[str, Any]] = []
        uploading: list[dict[str, Any]] = []
        if ledger:
            failed = ledger.last_job(model.name, State.FAILED)
            if failed is not None:
                last_failed = {"id": failed.id, "error": failed.error, "at": failed.updated_at}
            sending = ledger.jobs(state=State.UPLOADING, model=model.name)
            uploading = [
                {
                    "id": j.id,
                    "file": j.upload_filename,
                    "bytes_sent": j.bytes_sent,
                    "size_bytes": j.size_bytes,
                    "percent": round(100.0 * (j.bytes_sent or 0) / j.size_bytes, 1) if j.size_bytes else None,
                }
                for j in sending
                if j.put_started and not j.outcome_unknown_since
            ]
            unknown = [
                {
                    "id": j.id,
                    "file": j.upload_filename,
                    "retrain_job_id": j.retrain_job_id,
                    "since": j.outcome_unknown_since,
                }
                for j in sending
                if j.outcome_unknown_since
            ]
        out["models"].append(
            {
                "model": model.name,
                "inbox": str(model.inbox),
                "files_waiting": waiting,
                "oldest_waiting_file": oldest,
                "jobs": counts.get(model.name, {}),
                "paused": bool(row.get("paused_reason")),
                "paused_reason": row.get("paused_reason"),
                "paused_at": row.get("paused_at"),
                "last_success_at": row.get("last_success_at"),
                "last_error": row.get("last_error"),
                "last_error_at": row.get("last_error_at"),
                "last_failed_job": last_failed,
                "outcome_unknown": unknown,
                "uploading": uploading,
            }
        )
    return out


def _window(timetable: Timetable, now: datetime) -> dict[str, Any]:
    rate = timetable.rate_at(now)
    opens = timetable.opens_at(now)
    return {
        "open": rate != CLOSED,
        "rate": describe_rate(rate),
        "rate_bytes_per_s": rate,
        "opens_at": opens.isoformat(timespec="minutes") if opens is not None else None,
        "text": window_text(timetable, opens) if rate == CLOSED else f"upload rate now: {describe_rate(rate)}",
    }


def window_text(timetable: Timetable, opens_at: datetime | None) -> str:
    """How a closed upload window is reported (``status`` and the daemon's systemd status line)."""
    if opens_at is None:
        return "waiting for the upload window, which no rule of [upload] schedule opens"
    local = timetable.local(opens_at)
    zone = timetable.timezone.key if timetable.timezone is not None else local.strftime("%Z")
    return f"waiting for the upload window, opens at {local:%a %Y-%m-%d %H:%M} {zone}"


def waiting_files(inbox: Path, now: float | None = None) -> tuple[int, dict[str, Any] | None]:
    """How many files wait in an inbox, and the oldest one (name, modified_at, age_s)."""
    # The daemon moves files out while we look: an entry gone between the listing and its stat was not waiting.
    oldest: tuple[float, str] | None = None
    count = 0
    try:
        entries = list(os.scandir(inbox))
    except OSError:
        return 0, None
    for entry in entries:
        if is_ignored(entry.name) or entry.name in OWN_FOLDERS:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        count += 1
        if oldest is None or st.st_mtime < oldest[0]:
            oldest = (st.st_mtime, entry.name)
    if oldest is None:
        return count, None
    age = max(0.0, (time.time() if now is None else now) - oldest[0])
    when = datetime.fromtimestamp(oldest[0], UTC).isoformat(timespec="seconds")
    # A name that is not UTF-8 is shown with \\xff escapes: the report is printed (and JSON-encoded) as UTF-8.
    return count, {"file": printable_name(oldest[1]), "modified_at": when, "age_s": round(age)}


def render(report: dict[str, Any]) -> str:
    lines = [f"ledger: {report['ledger']}"]
    if "upload_window" in report:
        lines.append(f"upload: {report['upload_window']['text']}")
    for m in report["models"]:
        jobs = ", ".join(f"{state} {n}" for state, n in sorted(m["jobs"].items())) or "no jobs"
        lines.append(f"\n{m['model']}  ({m['inbox']})")
        lines.append(f"  jobs: {jobs}")
        oldest = m["oldest_waiting_file"]
        waiting = f"{m['files_waiting']} file(s) in the inbox"
        if oldest:
            waiting += f", oldest {oldest['file']!r} ({oldest['age_s']} s)"
        lines.append(f"  waiting: {waiting}")
        if m["paused"]:
            lines.append(f"  PAUSED since {m['paused_at']}: {m['paused_reason']}")
        for j in m.get("uploading", []):
            lines.append(f"  uploading: job {j['id']} {j['file']!r} {j['bytes_sent']} of {j['size_bytes']} bytes")
        for j in m.get("outcome_unknown", []):
            lines.append(
                f"  UPLOAD OUTCOME UNKNOWN: job {j['id']} {j['file']!r} since {j['since']}"
                " (its answer was lost; asking the status check, not sending it again until it answers)"
            )
        lines.append(f"  last success: {m['last_success_at'] or 'never'}")
        if m["last_error"]:
            lines.append(f"  last error ({m['last_error_at']}): {m['last_error']}")
        failed = m["last_failed_job"]
        if failed:
            lines.append(f"  last failed job {failed['id']} ({failed['at']}): {failed['error']}")
    return "\n".join(lines)


def health(
    report: dict[str, Any], failed: list[dict[str, Any]], *, lock_held: bool, alert_waiting_s: float
) -> tuple[int, str]:
    """The monitoring verdict on a :func:`collect` report: an exit code and a one-line summary with perfdata.

    CRITICAL: a model is paused, or no daemon holds the ledger lock. WARNING: a job failed in the last 24 h
    (``failed``: those jobs, as dicts), or a file waited longer than ``alert_waiting_s``.
    """
    critical: list[str] = []
    warning: list[str] = []
    if not lock_held:
        critical.append("no daemon holds the ledger lock")
    for m in report["models"]:
        if m["paused"]:
            critical.append(f"model {m['model']} paused: {m['paused_reason']}")
    for m in report["models"]:
        oldest = m["oldest_waiting_file"]
        if oldest and oldest["age_s"] > alert_waiting_s:
            warning.append(f"{m['model']}: {oldest['file']!r} waiting {oldest['age_s']} s")
    if failed:
        last = failed[-1]
        warning.append(f"{len(failed)} job(s) failed in 24 h, last {last['id']} {last['upload_filename']!r}")
    code = CRITICAL if critical else WARNING if warning else OK
    waiting = sum(m["files_waiting"] for m in report["models"])
    oldest_s = max((m["oldest_waiting_file"]["age_s"] for m in report["models"] if m["oldest_waiting_file"]), default=0)
    paused = sum(1 for m in report["models"] if m["paused"])
    if code == OK:
        text = f"{len(report['models'])} model(s), {waiting} file(s) waiting"
    else:
        text = "; ".join(critical + warning)
    perf = f"waiting={waiting} oldest_waiting_s={oldest_s}s;{alert_waiting_s:g} failed_24h={len(failed)}"
    perf += f" paused={paused}"
    return code, f"RETRAIN-UPLOADER {_LABELS[code]} - {_one_line(text)} | {perf}"


def failed_recently(ledger: Ledger | None, now: float) -> list[dict[str, Any]]:
    """Jobs that ended in a failure in the last 24 h, oldest first."""
    if ledger is None:
        return []
    return [j.as_dict() for j in ledger.failed_since(iso(now - FAILED_WINDOW_S), _FAILED)]


def unknown(reason: str) -> tuple[int, str]:
    return UNKNOWN, f"RETRAIN-UPLOADER UNKNOWN - {_one_line(reason)}"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "/")  # "|" starts the perfdata in the plugin format


def retry_job(settings: Settings, ledger: Ledger, job_id: int) -> list[str]:
    """Move a failed job's files from failed/ back into the inbox, where the daemon takes them as a new job; or, for
    a retrain_timeout job, follow its retraining again. Returns the lines to print."""
    job = ledger.get(job_id)
    if job.state is State.RETRAIN_TIMEOUT:
        # Its retraining was given up on, not its upload: follow it again (the daemon asks its status at its next
        # poll; a retraining that finished meanwhile becomes `finished`, and can be switched to).
        ledger.update(
            job.id,
            state=State.RETRAINING,
            watched_s=0.0,
            error=None,
            event="retried",
            detail={"follow_again": True},
            expect_state=State.RETRAIN_TIMEOUT,
        )
        return [f"following the retraining of job {job.id} again (retrain job {job.retrain_job_id})"]
    if job.state is not State.FAILED:
        raise ValueError(f"it is {job.state}, only failed (or retrain_timeout) jobs can be retried")
    if not job.closed:
        raise ValueError("the daemon is still moving its files; try again in a moment")
    retried = [e["at"] for e in ledger.events(job.id) if e["event"] == "retried"]
    if retried:
        # Its names in failed/ may now hold the files of the new job the daemon made of them.
        raise ValueError(f"it was retried already at {retried[-1]}; its files became a new job (see `jobs`)")
    try:
        inbox = settings.model(job.model).inbox
    except KeyError:
        raise ValueError(f"model {job.model!r} is no longer in the config") from None
    pairs = list(zip(job.sources, job.moved_to, strict=False))
    present = [(name, target) for name, target in pairs if target and (inbox / target).exists()]
    if not present:
        raise ValueError("its files are no longer in failed/ (retried already, or moved away)")
    for name, _ in present:
        if os.path.lexists(inbox / name):
            raise ValueError(f"{name!r} is in the inbox already; move it away first")
    for name, target in present:
        try:
            rename_no_replace(inbox / target, inbox / name)  # a file dropped meanwhile under that name is kept
        except FileExistsError:
            raise ValueError(f"{name!r} appeared in the inbox meanwhile; move it away first") from None
    if len(job.moved_to) > len(job.sources):
        error_file = inbox / job.moved_to[-1]
        if error_file.exists():
            error_file.rename(error_file.with_name(error_file.name + ".retried"))
    ledger.update(job.id, event="retried", detail={"restored": [n for n, _ in present]})
    return [f"restored {n}" for n, _ in present]


async def switch_job(settings: Settings, ledger: Ledger, job_id: int) -> str:
    """Publish the retrained model of a job (Retrain Model Switch) after a person reviewed the result."""
    job = ledger.get(job_id)
    # retrain_timeout: the daemon stopped asking, but the retraining may have finished since; the API says.
    switchable = (State.FINISHED, State.UPLOADED, State.RETRAINING, State.RETRAIN_TIMEOUT)
    if job.state not in switchable or not job.retrain_job_id:
        raise ValueError(f"it is {job.state}; only a finished retraining can be switched to")
    try:
        model = settings.model(job.model)
    except KeyError:  # not "no job N in the ledger": the job is there, its model is not
        raise ValueError(f"model {job.model!r} is no longer in the config") from None
    key = model.read_api_key()
    client = _client(settings)
    finished: dict[str, Any] = {}
    try:
        await client.switch_model(key, job.retrain_job_id)
        if job.state is not State.FINISHED:
            # Switched before the daemon saw it finish: record what the status says now, or retrain_status and
            # model_id would stay those of a retraining in progress (the daemon polls a switched job no more).
            with contextlib.suppress(ApiError, TransportError):
                status = await client.get_status(key, job.retrain_job_id)
                finished = {"retrain_status": status.status, "model_id": status.model_id, "error": None}
    except ApiError as e:
        if e.message.strip() == NOT_FINISHED_MESSAGE:
            raise ValueError("its retraining is not finished yet; try again later") from None
        raise ValueError(e.describe()) from None
    except TransportError as e:
        raise ValueError(str(e)) from None
    finally:
        await client.close()
    for _ in range(3):  # the running daemon may move the job on (retraining -> finished) meanwhile
        current = ledger.get(job.id)
        try:
            ledger.update(
                job.id,
                state=State.SWITCHED,
                switched_at=ledger.now(),
                **finished,
                event="switched",
                detail={"retrain_job_id": job.retrain_job_id, "by": "cli"},
                expect_state=current.state,
            )
            break
        except StaleJob:
            continue
    else:
        raise ValueError("the model was switched, but the ledger kept changing; run `jobs` to check the job")
    return f"job {job.id}: model {job.model} now serves retrain job {job.retrain_job_id}"


async def check_keys_online(settings: Settings) -> list[str]:
    """Prove each key with a status check of a job id that cannot exist: no retrain job is created.

    The request takes the daemon's way out (proxy, CAs): a failure names the hop (proxy, its credentials, DNS, TLS).
    """
    problems: list[str] = []
    client = _client(settings)
    try:
        for model in settings.models:
            try:
                key = model.read_api_key()
                await client.get_status(key, PROBE_JOB_ID)
            except ConfigError as e:
                problems.append(str(e))
            except ApiError as e:
                if is_credential_error(e):
                    problems.append(f"models.{model.name}: the API rejected the key: {e.message}")
                elif e.message.strip() != "Not found retrain job.":
                    problems.append(f"models.{model.name}: unexpected answer: {e.describe()}")
            except ProxyAuthFailed as e:
                problems.append(f"api.proxy: {e.detail}")
                break  # the same proxy serves every model
            except TransportError as e:
                problems.append(f"models.{model.name}: cannot reach the API at {settings.api.base_url}: {e.detail}")
            else:
                problems.append(f"models.{model.name}: unexpected answer: a job {PROBE_JOB_ID!r} exists")
    finally:
        await client.close()
    return problems


def _client(settings: Settings) -> Client:
    return Client(
        settings.api.base_url,
        connect_timeout_s=settings.api.connect_timeout_s,
        request_timeout_s=settings.api.request_timeout_s,
        network=Network.from_settings(settings.api),
    )
