"""The Prediction One emulator, exercised over real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import signal
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import structlog
from yarl import URL

from retrain_uploader.emulator import Emulator

KEY, OTHER = "key-seven", "key-eight"
API = "/v1/external/retrain_jobs"
BODY = b"a,b\n1,2\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def emu(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Emulator]:
    async with Emulator(keys={KEY: 7, OTHER: 8}, store_dir=tmp_path, retrain_s=60, url_ttl_s=600, clock=clock) as e:
        yield e


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def enc(url: str) -> URL:
    return URL(url, encoded=True)


async def call(
    session: aiohttp.ClientSession, method: str, url: str | URL, key: str | None = KEY, **kw: Any
) -> tuple[int, Any]:
    headers = {"x-api-key": key} if key is not None else {}
    async with session.request(method, url, headers=headers, **kw) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.content_type == "application/json" else text


async def new_job(
    session: aiohttp.ClientSession, emu: Emulator, filename: str = "train.csv", key: str = KEY
) -> tuple[str, str]:
    status, body = await call(session, "GET", enc(f"{emu.base_url}{API}/upload_url?filename={quote(filename)}"), key)
    assert status == 200, body
    return body["retrain_job_id"], body["upload_url"]


async def put(session: aiohttp.ClientSession, url: str | URL, data: Any = BODY) -> tuple[int, str]:
    async with session.put(enc(url) if isinstance(url, str) else url, data=data) as resp:
        return resp.status, await resp.text()


def job_url(emu: Emulator, job_id: str, suffix: str = "") -> URL:
    return enc(f"{emu.base_url}{API}/{job_id}{suffix}")


async def until(condition: Callable[[], bool]) -> None:
    """Wait for state the emulator owns (no event to wait on), with a deadline."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - polling the emulator's records is the point
            await asyncio.sleep(0.005)


def leftovers(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def bad_request(message: str) -> dict[str, Any]:
    return {"code": 4001000204, "error": "PREDA_EXTERNAL_BAD_REQUEST", "message": message}


async def test_happy_path(emu: Emulator, session: aiohttp.ClientSession, clock: FakeClock, tmp_path: Path) -> None:
    job_id, url = await new_job(session, emu)
    assert url.startswith(f"{emu.base_url}/_storage/retrain-bucket/{job_id}/train.csv?X-Amz-Algorithm=")
    assert "X-Amz-Credential=EMULATOR%2F" in url
    assert await call(session, "GET", job_url(emu, job_id)) == (
        200,
        {"status": "waiting_for_upload", "metadata": {"retrain_job_id": job_id}},
    )

    assert await put(session, url) == (200, "")
    (upload,) = emu.uploads
    assert (upload.job_id, upload.filename, upload.size, upload.content_length_header) == (
        job_id,
        "train.csv",
        len(BODY),
        len(BODY),
    )
    assert upload.sha256 == hashlib.sha256(BODY).hexdigest() == emu.jobs[job_id].uploaded_sha256
    assert upload.raw_target.endswith("X-Amz-Signature=REDACTED")
    assert "EMULATOR" not in upload.raw_target
    assert (tmp_path / f"{job_id}.bin").read_bytes() == BODY
    assert await call(session, "GET", job_url(emu, job_id)) == (
        200,
        {"status": "retraining", "metadata": {"retrain_job_id": job_id}},
    )
    assert await call(session, "PUT", job_url(emu, job_id, "/update_model")) == (
        400,
        bad_request("Retrain job is not finished."),
    )

    clock.now += 60
    status, body = await call(session, "GET", job_url(emu, job_id))
    assert (status, body["status"], body["model_id"]) == (200, "job_finished", 7)
    async with session.get(enc(body["download_url"])) as resp:
        assert resp.status == 200
        archive = zipfile.ZipFile(io.BytesIO(await resp.read()))
    assert archive.namelist() == ["result.csv"]
    assert job_id in archive.read("result.csv").decode()

    assert await call(session, "PUT", job_url(emu, job_id, "/update_model")) == (
        200,
        {"metadata": {"retrain_job_id": job_id}},
    )
    assert emu.jobs[job_id].switched
    assert [(r.endpoint, r.status) for r in emu.requests] == [
        ("upload_url", 200),
        ("status", 200),
        ("put", 200),
        ("status", 200),
        ("switch", 400),
        ("status", 200),
        ("result", 200),
        ("switch", 200),
    ]
    assert all("?" not in r.path for r in emu.requests)


async def test_retraining_finishes_after_retrain_s_on_the_real_clock(session: aiohttp.ClientSession) -> None:
    async with Emulator(retrain_s=0.05) as emu:
        job_id, url = await new_job(session, emu, key="demo-key")
        started = time.monotonic()
        assert (await put(session, url))[0] == 200
        statuses = []
        while "job_finished" not in statuses:
            _, body = await call(session, "GET", job_url(emu, job_id), "demo-key")
            statuses.append(body["status"])
        assert time.monotonic() - started >= 0.05
        assert set(statuses) == {"retraining", "job_finished"}


async def test_large_upload_from_a_file_is_streamed(
    emu: Emulator, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    source = tmp_path / "big.csv"
    source.write_bytes(bytes(range(256)) * 12_000)  # 3 MB: many chunks
    job_id, url = await new_job(session, emu)
    handle = await asyncio.to_thread(source.open, "rb")
    with handle:
        assert (await put(session, url, data=handle))[0] == 200
    assert emu.upload_count_by_sha() == {hashlib.sha256(source.read_bytes()).hexdigest(): 1}
    assert (tmp_path / f"{job_id}.bin").read_bytes() == source.read_bytes()


@pytest.mark.parametrize(
    "filename", ["学習データ 2026年11月.csv", "a+b&c#d.csv", "100% sure; x=y?.csv", "dir/file.csv", "+"]
)
async def test_filenames_round_trip(emu: Emulator, session: aiohttp.ClientSession, filename: str) -> None:
    job_id, url = await new_job(session, emu, filename)
    assert emu.jobs[job_id].filename == filename
    assert URL(url, encoded=True).raw_path.endswith("/" + quote(filename, safe=""))
    assert (await put(session, url))[0] == 200
    assert emu.uploads[-1].filename == filename


async def test_a_literal_plus_in_the_query_is_not_a_space(emu: Emulator, session: aiohttp.ClientSession) -> None:
    status, body = await call(session, "GET", enc(f"{emu.base_url}{API}/upload_url?x=1&filename=a+b.csv"))
    assert status == 200
    assert emu.jobs[body["retrain_job_id"]].filename == "a+b.csv"
    # Beware: aiohttp's params= form-encodes a space as '+', which this emulator reads as a literal '+'.
    status, body = await call(session, "GET", f"{emu.base_url}{API}/upload_url", params={"filename": "a b.csv"})
    assert emu.jobs[body["retrain_job_id"]].filename == "a+b.csv"


@pytest.mark.parametrize("query", ["", "?filename=", "?name=a.csv", "?filename=%FF.csv"])
async def test_upload_url_needs_a_filename(emu: Emulator, session: aiohttp.ClientSession, query: str) -> None:
    status, body = await call(session, "GET", enc(f"{emu.base_url}{API}/upload_url{query}"))
    assert (status, body) == (400, bad_request("filename is required."))
    assert emu.jobs == {}


async def test_requoted_url_is_rejected(emu: Emulator, session: aiohttp.ClientSession) -> None:
    _, url = await new_job(session, emu, "a&b.csv")
    # aiohttp (via yarl) re-quotes a plain str URL: %2F becomes / in the query, %26 becomes & in the path.
    assert URL(url).raw_query_string != URL(url, encoded=True).raw_query_string
    async with session.put(url, data=BODY) as resp:
        assert resp.status == 403
        assert "<Code>SignatureDoesNotMatch</Code>" in await resp.text()
    tampered = [url.replace("%2F", "/"), url[:-1] + ("0" if url[-1] != "0" else "1"), url.split("&X-Amz-Sig")[0]]
    for variant in tampered:
        status, text = await put(session, variant)
        assert status == 403
        assert "<Code>SignatureDoesNotMatch</Code>" in text
    assert emu.uploads == []


async def test_chunked_put_gets_501(emu: Emulator, session: aiohttp.ClientSession) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield BODY

    _, url = await new_job(session, emu)
    status, text = await put(session, url, data=body())
    assert status == 501
    assert "<Code>NotImplemented</Code>" in text
    assert emu.uploads == []


async def test_put_without_content_length_gets_411(emu: Emulator, session: aiohttp.ClientSession) -> None:
    _, url = await new_job(session, emu)
    target = URL(url, encoded=True).raw_path_qs
    reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
    try:
        writer.write(f"PUT {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 411 ")
    assert b"<Code>MissingContentLength</Code>" in response


async def test_expired_url_gets_403(emu: Emulator, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    _, url = await new_job(session, emu)
    clock.now += 600
    status, text = await put(session, url)
    assert status == 403
    assert "<Code>AccessDenied</Code><Message>Request has expired</Message>" in text
    assert emu.uploads == []


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("inactive", "Inactive_credential."),
        ("not_found", "Not_found_credential."),
        ("model_deleted", "This model may be deleted."),
        (None, "invalid_api_key."),
    ],
)
async def test_credential_errors(
    emu: Emulator, session: aiohttp.ClientSession, state: str | None, message: str
) -> None:
    job_id, _ = await new_job(session, emu)
    key = "no-such-key"
    if state is not None:
        emu.set_key_state(KEY, state)
        key = KEY
    for method, url in [
        ("GET", enc(f"{emu.base_url}{API}/upload_url?filename=a.csv")),
        ("GET", job_url(emu, job_id)),
        ("PUT", job_url(emu, job_id, "/update_model")),
    ]:
        assert await call(session, method, url, key) == (400, bad_request(message))
    assert len(emu.jobs) == 1


async def test_missing_key_is_invalid(emu: Emulator, session: aiohttp.ClientSession) -> None:
    assert await call(session, "GET", job_url(emu, "x"), None) == (400, bad_request("invalid_api_key."))
    with pytest.raises(ValueError, match="state"):
        emu.set_key_state(KEY, "sleepy")


async def test_jobs_of_other_models_and_unknown_jobs_are_not_found(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    job_id, _ = await new_job(session, emu)
    for job, key in [(job_id, OTHER), ("nope", KEY)]:
        for method, suffix in [("GET", ""), ("PUT", "/update_model")]:
            assert await call(session, method, job_url(emu, job, suffix), key) == (
                400,
                bad_request("Not found retrain job."),
            )


async def test_fail_retraining(emu: Emulator, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    emu.fail_retraining(KEY, "retrain_failed", "Target column has one value.")
    job_id, url = await new_job(session, emu)
    await put(session, url)
    clock.now += 60
    assert await call(session, "GET", job_url(emu, job_id)) == (
        200,
        {"status": "retrain_failed", "message": "Target column has one value.", "metadata": {"retrain_job_id": job_id}},
    )
    assert (await call(session, "PUT", job_url(emu, job_id, "/update_model")))[0] == 400


async def test_every_completed_put_counts(emu: Emulator, session: aiohttp.ClientSession) -> None:
    job_id, url = await new_job(session, emu)
    await put(session, url)
    await put(session, url)
    assert emu.upload_count_by_sha() == {hashlib.sha256(BODY).hexdigest(): 2}
    assert emu.jobs[job_id].uploads == 2


# -- faults -------------------------------------------------------------------------------------------------


async def test_http_status_fault_is_consumed_fifo(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject("status", "http_status", times=2, status=503, retry_after=7)
    emu.inject("status", "http_status", status=500, body="<h1>down</h1>", content_type="text/html")
    url = job_url(emu, "nope")
    for _ in range(2):
        async with session.get(url, headers={"x-api-key": KEY}) as resp:
            assert (resp.status, resp.headers["Retry-After"]) == (503, "7")
            assert await resp.json() == {
                "code": 5001000201,
                "error": "PREDA_EXTERNAL_INTERNAL_SERVER_ERROR",
                "message": "Emulated server error.",
            }
    assert await call(session, "GET", url) == (500, "<h1>down</h1>")
    assert await call(session, "GET", url) == (400, bad_request("Not found retrain job."))


async def test_http_status_fault_on_put_records_nothing(emu: Emulator, session: aiohttp.ClientSession) -> None:
    _, url = await new_job(session, emu)
    emu.inject("put", "http_status", status=503)
    status, text = await put(session, url)
    assert status == 503
    assert "<Code>SlowDown</Code>" in text
    assert emu.uploads == []
    assert (await put(session, url))[0] == 200


async def test_slow_fault(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject("upload_url", "slow", delay_s=0.2)
    started = time.monotonic()
    await new_job(session, emu)
    assert time.monotonic() - started >= 0.2


async def test_latency_applies_to_every_answer(session: aiohttp.ClientSession) -> None:
    async with Emulator(latency_s=0.1) as emu:
        started = time.monotonic()
        _, url = await new_job(session, emu, key="demo-key")
        await put(session, url)
        assert time.monotonic() - started >= 0.2


async def test_hang_fault_times_the_client_out(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject("status", "hang")
    with pytest.raises(asyncio.TimeoutError):
        await call(session, "GET", job_url(emu, "x"), timeout=aiohttp.ClientTimeout(total=0.2))
    assert (await call(session, "GET", job_url(emu, "x")))[0] == 400


async def test_hang_does_not_block_stop(session: aiohttp.ClientSession) -> None:
    emu = Emulator()
    await emu.start()
    emu.inject("switch", "hang")
    waiting = asyncio.create_task(call(session, "PUT", job_url(emu, "x", "/update_model"), "demo-key"))
    await until(lambda: bool(emu.requests))  # the request has arrived and is hanging
    await asyncio.wait_for(emu.stop(), timeout=5)
    with pytest.raises(aiohttp.ClientError):
        await waiting
    assert emu.requests[0].status is None


async def test_drop_fault_closes_the_connection(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject("upload_url", "drop", times=2)  # times=2: aiohttp re-sends an idempotent request once by itself
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await new_job(session, emu)
    assert emu.jobs == {}
    assert [(r.endpoint, r.status) for r in emu.requests] == [("upload_url", None)] * 2


async def test_aiohttp_resends_a_dropped_put_by_itself(emu: Emulator, session: aiohttp.ClientSession) -> None:
    """A PUT whose answer is lost is silently sent again by aiohttp: two completed PUTs, two retrainings."""
    _, url = await new_job(session, emu)
    emu.inject("put", "drop")
    assert await put(session, url) == (200, "")
    assert [(r.endpoint, r.status) for r in emu.requests[1:]] == [("put", None), ("put", 200)]
    assert emu.upload_count_by_sha() == {hashlib.sha256(BODY).hexdigest(): 2}


async def test_drop_after_body_records_the_upload(emu: Emulator, session: aiohttp.ClientSession) -> None:
    job_id, url = await new_job(session, emu)
    emu.inject("put", "drop", times=2)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await put(session, url)
    assert [u.job_id for u in emu.uploads] == [job_id] * 2
    assert emu.jobs[job_id].status == "retraining"


async def test_drop_mid_body_records_nothing(emu: Emulator, session: aiohttp.ClientSession, tmp_path: Path) -> None:
    job_id, url = await new_job(session, emu)
    emu.inject("put", "drop", times=2, after_body=False)
    with pytest.raises(aiohttp.ClientError):
        await put(session, url, data=io.BytesIO(b"x" * 8_000_000))
    assert emu.uploads == []
    assert emu.jobs[job_id].status == "waiting_for_upload"
    assert leftovers(tmp_path) == []


async def test_client_disconnect_mid_body_records_nothing(
    emu: Emulator, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, url = await new_job(session, emu)
    target = URL(url, encoded=True).raw_path_qs
    with structlog.testing.capture_logs() as events:
        _, writer = await asyncio.open_connection("127.0.0.1", emu.port)
        writer.write(f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() + b"x" * 10)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await until(lambda: any(e["event"] == "emulator.upload_incomplete" for e in events))
    assert emu.uploads == []
    assert leftovers(tmp_path) == []


async def test_expire_fault(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject("upload_url", "expire")
    _, url = await new_job(session, emu)
    status, text = await put(session, url)
    assert (status, "Request has expired" in text) == (403, True)


@pytest.mark.parametrize(("kind", "body"), [("malformed", "<html>oops"), ("wrong_shape", {"id": 1})])
async def test_malformed_and_wrong_shape(emu: Emulator, session: aiohttp.ClientSession, kind: str, body: Any) -> None:
    emu.inject("upload_url", kind)
    assert await call(session, "GET", enc(f"{emu.base_url}{API}/upload_url?filename=a")) == (200, body)
    assert emu.jobs == {}


@pytest.mark.parametrize(
    ("endpoint", "kind", "params"),
    [
        ("nowhere", "hang", {}),
        ("status", "explode", {}),
        ("put", "expire", {}),
        ("put", "malformed", {}),
        ("status", "drop", {"after_body": True}),
        ("status", "http_status", {}),
        ("status", "http_status", {"status": 500, "colour": "red"}),
        ("status", "slow", {"delay_s": -1}),
        ("status", "hang", {"times": 0}),
    ],
)
async def test_invalid_faults_are_refused(emu: Emulator, endpoint: str, kind: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        emu.inject(endpoint, kind, **params)


async def test_clear_faults(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.inject("upload_url", "http_status", status=500, times=3)
    emu.clear_faults()
    await new_job(session, emu)


# -- admin and logs -----------------------------------------------------------------------------------------


async def test_admin_http_endpoints(emu: Emulator, session: aiohttp.ClientSession) -> None:
    admin = f"{emu.base_url}/_emulator"
    spec = {"endpoint": "status", "kind": "http_status", "status": 502, "times": 1}
    assert await call(session, "POST", f"{admin}/faults", None, json=spec) == (201, {"queued": True})
    assert (await call(session, "GET", job_url(emu, "x")))[0] == 502
    assert (await call(session, "POST", f"{admin}/faults", None, json={"kind": "hang"}))[0] == 400
    assert (await call(session, "POST", f"{admin}/faults", None, data=b"[1]"))[0] == 400

    job_id, url = await new_job(session, emu)
    await put(session, url)
    _, uploads = await call(session, "GET", f"{admin}/uploads", None)
    assert [(u["job_id"], u["sha256"]) for u in uploads] == [(job_id, hashlib.sha256(BODY).hexdigest())]
    _, jobs = await call(session, "GET", f"{admin}/jobs", None)
    assert jobs[job_id]["status"] == "retraining"
    _, requests = await call(session, "GET", f"{admin}/requests", None)
    assert [r["endpoint"] for r in requests if r["endpoint"] != "other"] == ["status", "upload_url", "put"]

    emu.inject("status", "hang")
    assert await call(session, "DELETE", f"{admin}/faults", None) == (200, {"cleared": True})
    assert (await call(session, "GET", job_url(emu, "x")))[0] == 400


async def test_logs_name_the_upload_but_never_the_key_or_signature(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    with structlog.testing.capture_logs() as events:
        job_id, url = await new_job(session, emu, "売上.csv")
        await call(session, "GET", job_url(emu, job_id), "bad-key")
        await put(session, url)
    assert {
        "event": "emulator.upload_received",
        "log_level": "info",
        "job_id": job_id,
        "filename": "売上.csv",
        "size": len(BODY),
        "sha256": hashlib.sha256(BODY).hexdigest(),
    } in events
    logged = repr(events)
    assert KEY not in logged
    assert "bad-key" not in logged
    assert "X-Amz" not in logged


# -- serving from the command line --------------------------------------------------------------------------


@pytest.mark.slow
async def test_run_forever_prints_url_and_stops_on_sigterm(session: aiohttp.ClientSession) -> None:
    code = "from retrain_uploader.emulator import run_forever; run_forever(0, {'cli-key': 3})"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        lines: list[str] = []  # structlog's default (unconfigured) output shares stdout with the banner
        while not lines or "x-api-key" not in lines[-1]:
            lines.append((await asyncio.wait_for(proc.stdout.readline(), 20)).decode())
        assert "cli-key" in lines[-1]
        banner = re.search(r"listening on (http://127\.0\.0\.1:\d+)", "".join(lines))
        assert banner is not None, lines
        status, body = await call(session, "GET", f"{banner.group(1)}{API}/nope", "cli-key")
        assert (status, body) == (400, bad_request("Not found retrain job."))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_a_running_job_stays_retraining_until_finished(
    emu: Emulator, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    job = emu.add_running_job(KEY, "long.csv")
    clock.now += 10 * 60  # far past retrain_s
    assert await call(session, "GET", job_url(emu, job.job_id)) == (
        200,
        {"status": "retraining", "metadata": {"retrain_job_id": job.job_id}},
    )
    assert (await call(session, "GET", job_url(emu, job.job_id), OTHER))[1]["message"] == "Not found retrain job."
    emu.finish_job(job.job_id)
    status, body = await call(session, "GET", job_url(emu, job.job_id))
    assert (status, body["status"], body["model_id"]) == (200, "job_finished", 7)
    assert emu.uploads == []  # nothing was sent for it


async def test_a_running_job_ends_in_its_models_failure(emu: Emulator, session: aiohttp.ClientSession) -> None:
    job = emu.add_running_job(KEY)
    emu.fail_retraining(KEY, "retrain_failed", "No memory.")
    assert (await call(session, "GET", job_url(emu, job.job_id)))[1]["status"] == "retraining"
    emu.finish_job(job.job_id)
    _, body = await call(session, "GET", job_url(emu, job.job_id))
    assert (body["status"], body["message"]) == ("retrain_failed", "No memory.")


async def test_each_request_records_when_it_arrived(
    emu: Emulator, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    job = emu.add_running_job(KEY)
    await call(session, "GET", job_url(emu, job.job_id))
    clock.now += 2.5
    await call(session, "GET", job_url(emu, job.job_id))
    _, requests = await call(session, "GET", f"{emu.base_url}/_emulator/requests", None)
    assert [(r["endpoint"], r["job_id"], r["at"]) for r in requests if r["endpoint"] == "status"] == [
        ("status", job.job_id, 1000.0),
        ("status", job.job_id, 1002.5),
    ]
