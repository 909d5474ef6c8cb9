"""What a PUT whose answer was lost has become: one pure decision, from the status check's answer.

Every completed PUT starts a paid retraining, so a PUT is only sent again when a real status answer says the first
one did not arrive, and not before ``unknown_outcome_wait_s`` has passed since it ended: the remote status may change
some time after the object lands. Everything else (a check that failed in any way, however often) keeps asking.

The decision is :func:`decide`; :func:`read_answer` turns what the status check returned or raised into its input.
Both are pure and table-tested (tests/test_outcome.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .client import ApiError, JobStatus
from .ledger import State
from .policy import is_credential_error

__all__ = [
    "FINISHED_STATUS",
    "GONE_MESSAGES",
    "Answer",
    "Arrived",
    "CheckFailed",
    "Gone",
    "KeyRefused",
    "NotArrived",
    "PauseModel",
    "RemoteJobGone",
    "Seen",
    "Unresolved",
    "Verdict",
    "decide",
    "interpret",
    "read_answer",
]

# The only documented answers that say a remote job no longer exists (any endpoint's status check).
GONE_MESSAGES = frozenset({"Not found retrain job.", "This job may be deleted."})


# -- what the status check said -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Seen:
    """A real status answer."""

    status: str


@dataclass(frozen=True, slots=True)
class CheckFailed:
    """No usable answer: transport error, timeout, 5xx, 429, an HTML page, an undocumented 4xx, an odd body, a bug."""

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class KeyRefused:
    """The documented answers for an unusable key, model or user (the model is paused)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Gone:
    """A documented answer that the remote job does not exist (any more)."""

    reason: str


Answer = Seen | CheckFailed | KeyRefused | Gone


def read_answer(result: JobStatus | BaseException) -> Answer:
    """Sort the status check's result. Only the documented JSON answers count as more than "the check failed"."""
    if isinstance(result, JobStatus):
        return Seen(result.status)
    if isinstance(result, ApiError) and result.endpoint != "put":
        documented = result.error is not None or result.code is not None  # a parsed JSON error body
        if documented and result.message.strip() in GONE_MESSAGES:
            return Gone(result.describe())
        if is_credential_error(result):
            return KeyRefused(result.describe())
        return CheckFailed(result.describe(), result.retry_after)
    return CheckFailed(f"{type(result).__name__}: {result}")


# -- the verdict ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Arrived:
    """The status moved on from the baseline: the upload arrived (no second PUT)."""

    status: str


@dataclass(frozen=True, slots=True)
class NotArrived:
    """A real answer, after the minimum wait, still shows the baseline: send the file again."""

    status: str


@dataclass(frozen=True, slots=True)
class Unresolved:
    """Ask again later, never sooner than ``after_s`` (a server's Retry-After is the caller's to add)."""

    reason: str
    after_s: float
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class PauseModel:
    reason: str


@dataclass(frozen=True, slots=True)
class RemoteJobGone:
    """The remote job vanished after the PUT: whether it was received cannot be known; a person decides."""

    reason: str


Verdict = Arrived | NotArrived | Unresolved | PauseModel | RemoteJobGone


def decide(*, baseline: str | None, answer: Answer, since_put_s: float, wait_s: float) -> Verdict:
    """What a lost PUT answer means, given the status recorded before the PUT and the status check's answer now.

    ``since_put_s`` is how long this process has known the PUT to be over (after a restart: since it started
    asking), ``wait_s`` the minimum time before "unchanged" may be read as "not arrived".

    ========================  ==============================  =========================================
    answer                    condition                       verdict
    ========================  ==============================  =========================================
    Seen(s)                   baseline set, s != baseline     Arrived
    Seen(s)                   no baseline, s ended the job    Arrived (only a received upload ends one)
    Seen(s)                   otherwise, wait not over        Unresolved (after the rest of the wait)
    Seen(s)                   otherwise, wait over            NotArrived
    CheckFailed               any                             Unresolved (never NotArrived, never failed)
    KeyRefused                any                             PauseModel (the job waits for the key)
    Gone                      wait not over                   Unresolved (a new job may not be listed yet)
    Gone                      wait over                       RemoteJobGone
    ========================  ==============================  =========================================
    """
    remaining = max(0.0, wait_s - max(since_put_s, 0.0))
    if isinstance(answer, Seen):
        if baseline is not None and answer.status != baseline:
            return Arrived(answer.status)
        if baseline is None and _ended(answer.status):
            return Arrived(answer.status)
        if remaining > 0:
            why = f"status {answer.status!r} unchanged so far; a status may change some time after the upload lands"
            return Unresolved(why, remaining)
        return NotArrived(answer.status)
    if isinstance(answer, CheckFailed):
        return Unresolved(f"the status check failed: {answer.reason}", 0.0, answer.retry_after)
    if isinstance(answer, KeyRefused):
        return PauseModel(answer.reason)
    if remaining > 0:
        return Unresolved(f"the status check said the job is gone: {answer.reason}", remaining)
    return RemoteJobGone(answer.reason)


FINISHED_STATUS = "job_finished"


def interpret(status: str) -> State:
    """The only documented value is ``job_finished``; a value that says it failed ends the job; anything else —
    including values never seen before — means the retraining is still going on."""
    if status == FINISHED_STATUS:
        return State.FINISHED
    lowered = status.lower()
    if "fail" in lowered or "error" in lowered:
        return State.RETRAIN_FAILED
    return State.RETRAINING


def _ended(status: str) -> bool:
    return interpret(status) is not State.RETRAINING
