"""What to do about an error, and when to try again. Pure functions: no I/O, time and randomness passed in."""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass

from .client import ApiError, ProxyAuthFailed, SourceChanged, TransportError, UploadStalled
from .network import PROXY_AUTH_FAILED

__all__ = [
    "CREDENTIAL_MESSAGES",
    "Fail",
    "Pause",
    "RenewUrl",
    "Retry",
    "Verdict",
    "backoff_delay",
    "classify",
    "is_credential_error",
]

# Messages that mean "this model's key (or the model, or its owner) is unusable": every file of the model would fail
# the same way, so the model is paused rather than its files failed one by one.
CREDENTIAL_MESSAGES = frozenset(
    {
        "invalid_api_key.",
        "Inactive_credential.",
        "Not_found_credential.",
        "This user may be deleted.",
        "This model may be deleted.",
    }
)
# Retry-After is honoured over our own cap, but not without limit: a hostile or broken header must not park a job
# for days.
RETRY_AFTER_CEILING_S = 3600.0


@dataclass(frozen=True, slots=True)
class Retry:
    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class RenewUrl:
    reason: str


@dataclass(frozen=True, slots=True)
class Pause:
    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    reason: str


Verdict = Retry | RenewUrl | Pause | Fail


def classify(error: BaseException) -> Verdict:
    """Sort an error from any step into: retry it, get a fresh upload URL, pause the model, or fail the job."""
    if isinstance(error, UploadStalled) and not error.body_complete:
        # The last byte never left, so nothing arrived: try again at once through a fresh URL (a stuck storage node
        # may sit behind the old one). With the whole body sent the outcome is unknown: settled like any lost answer.
        return RenewUrl(str(error))
    if isinstance(error, ProxyAuthFailed):
        # Every request goes through that proxy: nothing can succeed until its credentials are fixed (and reloaded).
        return Pause(PROXY_AUTH_FAILED)
    if isinstance(error, TransportError):
        return Retry(str(error))
    if isinstance(error, SourceChanged):
        return Retry(str(error))  # the job is packaged again from the file as it is now
    if isinstance(error, ApiError):
        return _classify_api(error)
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EMFILE, errno.ENFILE):
            return Retry(f"local disk or resource problem: {error.strerror}")
        return Fail(f"{type(error).__name__}: {error.strerror or error}")
    return Fail(f"{type(error).__name__}: {error}")


def is_credential_error(error: ApiError) -> bool:
    """The key, the model or its owner is unusable (documented messages, or a plain 401/403 from the API)."""
    return error.endpoint != "put" and (error.message.strip() in CREDENTIAL_MESSAGES or error.http_status in (401, 403))


def _classify_api(error: ApiError) -> Verdict:
    status = error.http_status
    if error.endpoint == "put":
        if status == 403:
            return RenewUrl(error.describe())
        if status in (408, 429) or status >= 500:
            return Retry(error.describe(), error.retry_after)
        return Fail(error.describe())
    if is_credential_error(error):
        return Pause(error.describe())
    if status in (408, 429) or status >= 500:
        return Retry(error.describe(), error.retry_after)
    if 200 <= status < 300:
        return Retry(error.describe())  # an unusable success body: the next answer may be whole
    return Fail(error.describe())


def backoff_delay(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1).

    Capped exponential backoff with "equal jitter" (half fixed, half random) so a burst of failures spreads out
    but never retries sooner than half the nominal delay. A server's Retry-After wins, up to an hour.
    """
    if retry_after is not None:
        return min(max(retry_after, 0.0), RETRY_AFTER_CEILING_S)
    exponent = min(max(attempt - 1, 0), 62)
    nominal = min(max_s, base_s * (2.0**exponent))
    r = (rng or random).random()
    return nominal / 2 + r * nominal / 2
