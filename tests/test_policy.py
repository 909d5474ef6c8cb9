import errno
import random

from hypothesis import given
from hypothesis import strategies as st

from retrain_uploader.client import ApiError, SourceChanged, TransportError
from retrain_uploader.policy import (
    CREDENTIAL_MESSAGES,
    RETRY_AFTER_CEILING_S,
    Fail,
    Pause,
    RenewUrl,
    Retry,
    backoff_delay,
    classify,
)

API_ENDPOINTS = ["upload_url", "status", "switch"]


def api_error(endpoint: str, status: int, message: str = "x", retry_after: float | None = None) -> ApiError:
    return ApiError(endpoint, status, code=4001000204, error="PREDA_EXTERNAL_BAD_REQUEST", message=message,
                    retry_after=retry_after)


@given(st.sampled_from(sorted(CREDENTIAL_MESSAGES)), st.sampled_from(API_ENDPOINTS), st.sampled_from([400, 401, 403]))
def test_credential_messages_pause_the_model(message: str, endpoint: str, status: int) -> None:
    assert isinstance(classify(api_error(endpoint, status, message)), Pause)


@given(st.sampled_from([*API_ENDPOINTS, "put"]), st.integers(500, 599) | st.just(429) | st.just(408))
def test_server_errors_and_throttling_are_retried(endpoint: str, status: int) -> None:
    verdict = classify(api_error(endpoint, status, "Not found configuration_file.", retry_after=7))
    assert verdict == Retry(api_error(endpoint, status, "Not found configuration_file.").describe(), 7)


def test_put_403_renews_the_url_and_other_put_4xx_fail() -> None:
    assert isinstance(classify(api_error("put", 403, "Request has expired")), RenewUrl)
    assert isinstance(classify(api_error("put", 400, "EntityTooLarge")), Fail)


@given(st.sampled_from(["This job may be deleted.", "Not found retrain job.", "Not found classifier.", "weird"]))
def test_other_api_4xx_fail_the_job(message: str) -> None:
    verdict = classify(api_error("upload_url", 400, message))
    assert isinstance(verdict, Fail)
    assert message in verdict.reason


def test_transport_and_local_resource_errors_retry_other_os_errors_fail() -> None:
    assert isinstance(classify(TransportError("put", "ServerDisconnectedError")), Retry)
    assert isinstance(classify(SourceChanged("changed")), Retry)
    assert isinstance(classify(OSError(errno.ENOSPC, "No space left on device")), Retry)
    assert isinstance(classify(OSError(errno.EACCES, "Permission denied")), Fail)
    assert isinstance(classify(ValueError("bug")), Fail)


def test_unusable_success_body_is_retried() -> None:
    assert isinstance(classify(ApiError("upload_url", 200, message="response is not JSON")), Retry)


@given(
    attempt=st.integers(1, 10_000),
    base=st.floats(0.001, 10),
    cap=st.floats(10, 1000),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_capped_and_jittered(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = backoff_delay(attempt, base_s=base, max_s=cap, rng=random.Random(seed))
    nominal = min(cap, base * 2.0 ** min(attempt - 1, 62))
    assert nominal / 2 - 1e-9 <= delay <= nominal + 1e-9
    assert delay <= cap


@given(st.floats(-10, 1e9))
def test_retry_after_wins_but_is_bounded(retry_after: float) -> None:
    delay = backoff_delay(3, base_s=1, max_s=5, retry_after=retry_after)
    assert delay == min(max(retry_after, 0.0), RETRY_AFTER_CEILING_S)


def test_backoff_grows_exponentially_until_the_cap() -> None:
    class Fixed(random.Random):
        def random(self) -> float:
            return 1.0

    delays = [backoff_delay(a, base_s=1, max_s=10, rng=Fixed()) for a in range(1, 7)]
    assert delays == [1, 2, 4, 8, 10, 10]
