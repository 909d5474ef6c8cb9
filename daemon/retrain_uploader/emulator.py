"""A local stand-in for the Prediction One Retrain API, with fault injection.

It serves on loopback over real sockets for the daemon's tests, the `demo` command and
`retrain-uploader emulator`. Upload URLs are presigned-style (HMAC over the exact request target), so
clients that re-quote URLs, send chunked bodies or reuse expired URLs fail as they would in production.
Status values are undocumented upstream apart from `job_finished`; this emulator uses
`waiting_for_upload` -> `retraining` -> `job_finished` (or the status given to `fail_retraining`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import io
import math
import secrets
import signal
import ssl
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ._emulator_faults import (
    ENDPOINTS,
    EXCHANGE,
    Exchange,
    FaultQueue,
    Handler,
    api_error,
    apply_fault,
    make_fault,
    pause,
    s3_error,
)

__all__ = ["FINISHED", "RETRAINING", "WAITING", "Emulator", "Job", "RequestRecord", "Upload", "run_forever", "serve"]

log = structlog.get_logger("retrain_uploader.emulator")

WAITING = "waiting_for_upload"
RETRAINING = "retraining"
FINISHED = "job_finished"
_KEY_MESSAGES: dict[str, str | None] = {
    "active": None,
    "inactive": "Inactive_credential.",
    "not_found": "Not_found_credential.",
    "model_deleted": "This model may be deleted.",
}
_SIGNATURE = "&X-Amz-Signature="
_MISMATCH = "The request signature we calculated does not match the signature you provided."
_API = "/v1/external/retrain_jobs"
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Upload:
    """A completed PUT: the whole body arrived and was accepted (each one is a paid retraining)."""

    job_id: str
    filename: str
    sha256: str
    size: int
    content_length_header: int
    raw_target: str  # query values redacted
    at: float  # emulator clock


@dataclass
class RequestRecord:
    """One request as received; status is None when no answer was sent (dropped, hung, cancelled)."""

    method: str
    endpoint: str  # upload_url | put | status | switch | result | other
    job_id: str | None
    path: str  # raw, without the query
    status: int | None = None
    at: float = 0.0  # emulator clock when the request arrived (before any latency or fault)
    dropped: bool = False  # its connection was cut by a "drop" fault (status stays None, as while it is in flight)


@dataclass
class Job:
    """A retrain job as the emulator sees it."""

    job_id: str
    model_id: int
    filename: str
    status: str = WAITING
    message: str | None = None
    uploaded_sha256: str | None = None
    switched: bool = False
    uploads: int = 0
    created_at: float = 0.0
    retrain_started_at: float | None = None


class Emulator:
    """The Retrain API on `host:port` (port 0 picks a free one); use `async with Emulator() as emu:`.

    keys maps api_key -> model_id. url_ttl_s is the lifetime of upload and download URLs; retrain_s the
    time from a completed PUT to `job_finished`; latency_s a delay before every non-admin answer; status_lag_s how
    long a received upload still shows `waiting_for_upload` (the real service's lag is unknown);
    store_dir, if set, receives each completed PUT body as `<job_id>.bin`; clock drives expiry and retraining.
    """

    def __init__(
        self,
        *,
        keys: Mapping[str, int] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        url_ttl_s: float = 3600.0,
        retrain_s: float = 0.0,
        latency_s: float = 0.0,
        status_lag_s: float = 0.0,
        store_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
        public_host: str | None = None,
        storage_host: str | None = None,
    ) -> None:
        self._keys = dict(keys if keys is not None else {"demo-key": 1})
        self._key_states = dict.fromkeys(self._keys, "active")
        self._host, self._port = host, port
        # Served over https with ssl_context; public_host names the API in base_url and storage_host the presigned
        # upload and result URLs (names a proxy may resolve while this host cannot): both default to `host`.
        self._ssl_context = ssl_context
        self._public_host = public_host or host
        self._storage_host = storage_host or self._public_host
        self._url_ttl_s, self._retrain_s, self._latency_s = url_ttl_s, retrain_s, latency_s
        self._store_dir, self._clock = store_dir, clock
        self._status_lag_s = status_lag_s
        self._secret = secrets.token_bytes(32)
        self._grants: dict[str, float] = {}  # signed path -> expiry on the emulator clock
        self._result_urls: dict[str, str] = {}
        self._failures: dict[int, tuple[str, str | None]] = {}
        self._faults = FaultQueue()
        self._jobs: dict[str, Job] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.uploads: list[Upload] = []
        self.requests: list[RequestRecord] = []

    async def start(self) -> None:
        """Bind and serve; afterwards `port` and `base_url` are valid."""
        self._stopping = asyncio.Event()
        app = web.Application(middlewares=[self._middleware])
        router = app.router
        router.add_get(f"{_API}/upload_url", self._upload_url, name="upload_url", allow_head=False)
        router.add_get(f"{_API}/{{job_id}}", self._status, name="status", allow_head=False)
        router.add_put(f"{_API}/{{job_id}}/update_model", self._switch, name="switch")
        router.add_put("/_storage/retrain-bucket/{job_id}/{name:.+}", self._put, name="put")
        router.add_get("/_storage/results/{job_id}.zip", self._result, name="result", allow_head=False)
        router.add_post("/_emulator/faults", self._admin_inject)  # admin routes: no key, for other processes
        router.add_delete("/_emulator/faults", self._admin_clear)
        router.add_get("/_emulator/{what:uploads|jobs|requests}", self._admin_list, allow_head=False)
        # No access log: it would print signed query strings. Cancel handlers of clients that went away.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl_context).start()
        self._runner = runner
        self._port = runner.addresses[0][1]
        log.info("emulator.started", base_url=self.base_url)

    async def stop(self) -> None:
        """Stop serving; hung and slowed requests are released (their connections dropped)."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        self._stopping.set()
        await runner.cleanup()
        log.info("emulator.stopped", base_url=self.base_url)

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        if self._port == 0:
            msg = "the emulator has not been started"
            raise RuntimeError(msg)
        return self._url(self._public_host)

    @property
    def storage_url(self) -> str:
        """Where presigned upload and result URLs point."""
        return self._url(self._storage_host)

    def _url(self, host: str) -> str:
        if self._port == 0:
            msg = "the emulator has not been started"
            raise RuntimeError(msg)
        return f"{'https' if self._ssl_context is not None else 'http'}://{host}:{self._port}"

    @property
    def keys(self) -> dict[str, int]:
        return dict(self._keys)

    @property
    def jobs(self) -> dict[str, Job]:
        """retrain_job_id -> Job, statuses brought up to date with the clock."""
        for job in self._jobs.values():
            self._refresh(job)
        return self._jobs

    def upload_count_by_sha(self) -> collections.Counter[str]:
        return collections.Counter(upload.sha256 for upload in self.uploads)

    def inject(self, endpoint: str, kind: str, *, times: int = 1, **params: Any) -> None:
        """Queue a fault for the next `times` requests at `endpoint` (FIFO); raises ValueError if invalid."""
        self._faults.push(make_fault(endpoint, kind, params), times)
        log.info("emulator.fault_queued", endpoint=endpoint, kind=kind, times=times)

    def clear_faults(self) -> None:
        self._faults.clear()

    def set_key_state(self, api_key: str, state: str) -> None:
        """Make a known key active, inactive, not_found or model_deleted (unknown keys are always invalid)."""
        if api_key not in self._keys or state not in _KEY_MESSAGES:
            msg = f"unknown key or state {state!r}; states are {sorted(_KEY_MESSAGES)}"
            raise ValueError(msg)
        self._key_states[api_key] = state

    def fail_retraining(
        self, api_key: str, status: str = "retrain_failed", message: str = "Retraining failed."
    ) -> None:
        """Jobs of this key's model that have not yet finished end in `status` with `message`."""
        if status == FINISHED:
            msg = f"a failure status must not be {FINISHED!r}"
            raise ValueError(msg)
        self._failures[self._keys[api_key]] = (status, message)

    def add_running_job(self, api_key: str, filename: str = "preloaded.csv") -> Job:
        """A job of this key's model, already uploaded, that stays ``retraining`` (whatever ``retrain_s``) until
        `finish_job`: for following many long retrainings without uploading each."""
        job = Job(
            job_id=str(uuid.uuid4()),
            model_id=self._keys[api_key],
            filename=filename,
            status=RETRAINING,
            uploads=1,
            created_at=self._clock(),
        )
        self._jobs[job.job_id] = job
        return job

    def finish_job(self, job_id: str) -> None:
        """End a job now: ``job_finished``, or the status its model was given by `fail_retraining`."""
        job = self._jobs[job_id]
        job.status, job.message = self._failures.get(job.model_id, (FINISHED, None))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        name = request.match_info.route.name
        endpoint = name if name is not None and name in ENDPOINTS else "other"
        path = request.raw_path.partition("?")[0]
        record = RequestRecord(request.method, endpoint, request.match_info.get("job_id"), path, at=self._clock())
        self.requests.append(record)
        exchange = Exchange()
        EXCHANGE.set(exchange)
        try:
            if endpoint != "other":
                await pause(self._stopping, self._latency_s)
            fault = self._faults.pop(endpoint)
            response = await (apply_fault(fault, request, handler, self._stopping) if fault else handler(request))
        except web.HTTPException as exc:
            record.status = exc.status
            raise
        finally:
            record.job_id = record.job_id or exchange.job_id
        record.status = None if exchange.dropped else response.status
        record.dropped = exchange.dropped
        return response

    def _presign(self, path: str, ttl: float) -> str:
        now = datetime.now(UTC)
        credential = quote(f"EMULATOR/{now:%Y%m%d}/ap-northeast-1/s3/aws4_request", safe="")
        unsigned = (
            f"{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={credential}"
            f"&X-Amz-Date={now:%Y%m%dT%H%M%SZ}&X-Amz-Expires={math.ceil(ttl)}"
        )
        expires_at = self._clock() + ttl
        self._grants[path] = expires_at
        return f"{self.storage_url}{unsigned}{_SIGNATURE}{self._sign(unsigned, expires_at)}"

    def _sign(self, unsigned: str, expires_at: float) -> str:
        text = f"{unsigned}\n{expires_at!r}".encode()
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()

    def _verify(self, raw_target: str) -> web.Response | None:
        """Check a presigned request target byte for byte; an S3-like 403 if it fails."""
        unsigned, sep, signature = raw_target.rpartition(_SIGNATURE)
        expires_at = self._grants.get(raw_target.partition("?")[0])
        if (
            expires_at is None
            or not sep
            or not hmac.compare_digest(signature.encode(), self._sign(unsigned, expires_at).encode())
        ):
            return s3_error(403, "SignatureDoesNotMatch", _MISMATCH)
        if self._clock() >= expires_at:
            return s3_error(403, "AccessDenied", "Request has expired")
        return None

    def _authorize(self, request: web.Request) -> int:
        """The key's model id, or the API's credential error (the key itself is never logged)."""
        key = request.headers.get("x-api-key", "")
        state = self._key_states.get(key)
        message = "invalid_api_key." if state is None else _KEY_MESSAGES[state]
        if message is not None:
            log.info("emulator.credential_rejected", path=request.path, message=message)
            raise api_error(message)
        return self._keys[key]

    def _owned_job(self, request: web.Request, model_id: int) -> Job:
        job = self._jobs.get(request.match_info["job_id"])
        if job is None or job.model_id != model_id:
            raise api_error("Not found retrain job.")
        return self._refresh(job)

    def _refresh(self, job: Job) -> Job:
        started = job.retrain_started_at
        if job.status == WAITING and started is not None and self._clock() >= started:
            job.status = RETRAINING
        if job.status == RETRAINING and started is not None and self._clock() >= started + self._retrain_s:
            job.status, job.message = self._failures.get(job.model_id, (FINISHED, None))
            log.info("emulator.retrain_ended", job_id=job.job_id, status=job.status)
        return job

    async def _upload_url(self, request: web.Request) -> web.Response:
        model_id = self._authorize(request)
        filename = _filename_from(request.raw_path)
        if not filename:
            raise api_error("filename is required.")
        job = Job(job_id=str(uuid.uuid4()), model_id=model_id, filename=filename, created_at=self._clock())
        self._jobs[job.job_id] = job
        exchange = EXCHANGE.get()
        exchange.job_id = job.job_id
        ttl = 0.0 if exchange.expire else self._url_ttl_s
        url = self._presign(f"/_storage/retrain-bucket/{job.job_id}/{quote(filename, safe='')}", ttl)
        log.info("emulator.job_created", job_id=job.job_id, model_id=model_id, filename=filename)
        return web.json_response({"retrain_job_id": job.job_id, "upload_url": url})

    async def _status(self, request: web.Request) -> web.Response:
        job = self._owned_job(request, self._authorize(request))
        body: dict[str, Any] = {"status": job.status, "metadata": {"retrain_job_id": job.job_id}}
        if job.status == FINISHED:
            body["model_id"] = job.model_id
            body["download_url"] = self._result_url(job.job_id)
        elif job.message is not None:
            body["message"] = job.message
        return web.json_response(body)

    async def _switch(self, request: web.Request) -> web.Response:
        job = self._owned_job(request, self._authorize(request))
        if job.status != FINISHED:
            raise api_error("Retrain job is not finished.")
        job.switched = True
        log.info("emulator.model_switched", job_id=job.job_id, model_id=job.model_id)
        return web.json_response({"metadata": {"retrain_job_id": job.job_id}})

    def _result_url(self, job_id: str) -> str:
        path = f"/_storage/results/{job_id}.zip"
        if job_id not in self._result_urls or self._clock() >= self._grants[path]:
            self._result_urls[job_id] = self._presign(path, self._url_ttl_s)
        return self._result_urls[job_id]

    async def _put(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            rejected: web.Response | None = s3_error(
                501, "NotImplemented", "A header you provided implies functionality that is not implemented"
            )
        elif "Content-Length" not in request.headers:
            rejected = s3_error(411, "MissingContentLength", "You must provide the Content-Length HTTP header.")
        else:
            rejected = self._verify(request.raw_path)
        if rejected is not None:
            log.info("emulator.upload_rejected", job_id=job_id, status=rejected.status)
            return rejected
        expected = int(request.headers["Content-Length"])
        sha256 = await self._receive(request, job_id, expected)
        if sha256 is None:
            return web.Response(status=400)  # nobody is listening any more
        job, now = self._jobs[job_id], self._clock()
        target = _redact(request.raw_path)
        self.uploads.append(Upload(job_id, job.filename, sha256, expected, expected, target, now))
        job.message, job.uploaded_sha256, job.retrain_started_at = None, sha256, now + self._status_lag_s
        job.status = RETRAINING if self._status_lag_s <= 0 else WAITING
        job.uploads += 1
        log.info("emulator.upload_received", job_id=job_id, filename=job.filename, size=expected, sha256=sha256)
        return web.Response()

    async def _receive(self, request: web.Request, job_id: str, expected: int) -> str | None:
        """Stream the body into sha256 (and store_dir); None unless all `expected` bytes arrived."""
        digest, size, complete = hashlib.sha256(), 0, False
        part = self._store_dir / f"{job_id}.{uuid.uuid4().hex}.part" if self._store_dir else None
        # Plain file calls: a 64 KiB local write costs less than a thread hop, and a close in `finally`
        # cannot be cut short when the handler is cancelled because the client went away.
        sink = part.open("wb") if part else None
        try:
            with contextlib.suppress(ConnectionError, HttpProcessingError):  # the client went away
                async for chunk in request.content.iter_chunked(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    if sink is not None:
                        sink.write(chunk)
            complete = size == expected
        finally:
            if sink is not None:
                sink.close()
            if part is not None and not complete:
                part.unlink(missing_ok=True)
            if not complete:
                log.info("emulator.upload_incomplete", job_id=job_id, received=size, expected=expected)
        if not complete:
            return None
        if part is not None:
            part.replace(part.parent / f"{job_id}.bin")
        return digest.hexdigest()

    async def _result(self, request: web.Request) -> web.Response:
        rejected = self._verify(request.raw_path)
        if rejected is not None:
            return rejected
        job = self._jobs[request.match_info["job_id"]]
        return web.Response(body=_result_zip(job), content_type="application/zip")

    async def _admin_inject(self, request: web.Request) -> web.Response:
        try:
            spec = dict(await request.json())
            self.inject(spec.pop("endpoint"), spec.pop("kind"), times=spec.pop("times", 1), **spec)
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"queued": True}, status=201)

    async def _admin_clear(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return web.json_response({"cleared": True})

    async def _admin_list(self, request: web.Request) -> web.Response:
        what = request.match_info["what"]
        if what == "jobs":
            return web.json_response({job_id: asdict(job) for job_id, job in self.jobs.items()})
        return web.json_response([asdict(item) for item in (self.uploads if what == "uploads" else self.requests)])


def _filename_from(raw_target: str) -> str | None:
    # A literal '+' stays '+': only form encoding reads it as a space.
    for pair in raw_target.partition("?")[2].split("&"):
        name, _, value = pair.partition("=")
        if name == "filename":
            with contextlib.suppress(UnicodeDecodeError):
                return unquote(value, errors="strict")
            return None
    return None


def _redact(raw_target: str) -> str:
    path, sep, query = raw_target.partition("?")
    names = (pair.partition("=")[0] for pair in query.split("&"))
    return path + sep + "&".join(f"{name}=REDACTED" for name in names) if sep else path


def _result_zip(job: Job) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("result.csv", f"retrain_job_id,model_id,metric,value\n{job.job_id},{job.model_id},auc,0.9\n")
    return buffer.getvalue()


async def serve(
    port: int,
    keys: Mapping[str, int] | None = None,
    *,
    stop: asyncio.Event,
    on_ready: Callable[[Emulator], None] | None = None,
    **options: Any,
) -> None:
    """Serve an emulator on 127.0.0.1:`port` until `stop` is set; `options` go to `Emulator`."""
    async with Emulator(keys=keys, port=port, **options) as emulator:
        if on_ready is not None:
            on_ready(emulator)
        await stop.wait()


def run_forever(port: int, keys: Mapping[str, int] | None = None, **options: Any) -> None:
    """Serve until SIGINT or SIGTERM, printing the base URL and the API keys once listening."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(port, keys, stop=stop, on_ready=_print_banner, **options)

    asyncio.run(main())


def _print_banner(emulator: Emulator) -> None:
    print(f"Prediction One emulator listening on {emulator.base_url}", flush=True)
    for key, model_id in emulator.keys.items():
        print(f"  x-api-key: {key}  (model_id {model_id})", flush=True)
    print("Stop with Ctrl+C.", flush=True)
