"""The Retrain API's HTTP calls, turned into typed results and typed errors. No retry policy lives here."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import struct
import termios
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiofiles
import aiohttp
from aiohttp.abc import AbstractStreamWriter
from yarl import URL

from .bandwidth import TokenBucket, WindowClosed
from .checks import InputError
from .network import PROXY_AUTH_FAILED, Network, describe_failure
from .redact import redact_url, scrub
from .retry_after import parse_retry_after

if TYPE_CHECKING:
    from .streamcheck import StreamCheck

__all__ = [
    "ApiError",
    "Client",
    "JobStatus",
    "ProxyAuthFailed",
    "ResultTooLarge",
    "SourceChanged",
    "TransportError",
    "UploadCut",
    "UploadMeter",
    "UploadStalled",
    "UploadTicket",
    "redirect_allowed",
]

_API = "/v1/external/retrain_jobs"
_CHUNK = 1 << 20
_SLICE = 64 << 10  # the body goes out in slices this big, so a slow but moving upload shows progress often
_THREAD_HASH_MIN = 256 << 10  # smaller chunks are hashed inline: a thread hop would cost more than it saves
# A body up to this size is read on the event loop: its open, reads and close as thread hops cost about 350 us of CPU,
# reading a few KB from the page cache about 7 us (the runner checks such a file on the loop too).
_INLINE_READ_MAX = 256 << 10
_MAX_ERROR_BODY = 8192


class TransportError(ConnectionError):
    """No HTTP answer: connection refused or cut, or a timeout.

    For a PUT, ``body_complete`` says whether its last byte was handed to the connection: if not, the storage cannot
    hold the object (no retraining started); if so, the outcome is unknown until the status check settles it.
    """

    def __init__(self, endpoint: str, detail: str, *, body_complete: bool = True) -> None:
        self.endpoint = endpoint
        self.detail = detail
        self.body_complete = body_complete
        super().__init__(f"{endpoint}: {detail}")


class ProxyAuthFailed(TransportError):
    """The proxy answered 407: its credentials (``[api] proxy``, ``proxy_password_file``) are missing or wrong.

    Nothing reached the far side. Every request goes through the same proxy, so it is a configuration problem.
    """

    def __init__(self, endpoint: str, proxy: object, source: str) -> None:
        detail = (
            f"{PROXY_AUTH_FAILED}: the proxy {proxy} (from {source}) answered 407 Proxy Authentication Required;"
            " check the user and password of [api] proxy (or proxy_password_file), then reload"
        )
        super().__init__(endpoint, detail, body_complete=False)


class ApiError(Exception):
    """The far side answered, but not with what the step needs (an error status or an unusable body)."""

    def __init__(
        self,
        endpoint: str,
        http_status: int,
        *,
        code: int | None = None,
        error: str | None = None,
        message: str,
        retry_after: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.http_status = http_status
        self.code = code
        self.error = error
        self.message = message
        self.retry_after = retry_after
        # For a PUT: whether its last byte had left when the answer came (a 5xx after it may come from a gateway
        # in front of a storage that kept the object).
        self.body_complete = False
        super().__init__(self.describe())

    def describe(self) -> str:
        parts = [f"{self.endpoint}: HTTP {self.http_status}"]
        if self.code is not None:
            parts.append(f"code {self.code}")
        if self.error:
            parts.append(self.error)
        return " ".join(parts) + f": {self.message}"


class UploadStalled(TransportError):
    """Nothing moved either way on a PUT for ``upload_read_timeout_s``: the attempt was aborted.

    ``body_complete`` tells whether the last byte had been handed to the socket: if not, the storage cannot have a
    whole object (it was never sent); if so, the outcome is unknown and must be settled like any lost answer.
    """

    def __init__(self, idle_s: float, *, sent: int, size: int, body_complete: bool) -> None:
        self.idle_s = idle_s
        self.sent = sent
        where = "waiting for the answer" if body_complete else f"after {sent} of {size} bytes"
        detail = f"timed out: no progress for {idle_s:g} s {where}; upload aborted"
        super().__init__("put", detail, body_complete=body_complete)


class UploadCut(TransportError):
    """The upload window closed (``on_close = "abort"``): the PUT was cut before its last byte, so nothing arrived."""

    def __init__(self, *, sent: int, size: int) -> None:
        self.sent = sent
        super().__init__("put", f"the upload window closed; cut after {sent} of {size} bytes", body_complete=False)


class ResultTooLarge(ValueError):
    """A retraining result over ``[status] max_result_bytes``: not downloaded, not retried."""


class SourceChanged(RuntimeError):
    """The file's bytes differ from the ones checked; the PUT was aborted before its last byte."""


@dataclass(frozen=True, slots=True)
class UploadTicket:
    retrain_job_id: str
    upload_url: str  # a credential: never logged or stored

    def __repr__(self) -> str:
        return f"UploadTicket(retrain_job_id={self.retrain_job_id!r}, upload_url={redact_url(self.upload_url)!r})"


@dataclass(frozen=True, slots=True)
class JobStatus:
    status: str
    model_id: int | None = None
    message: str | None = None
    download_url: str | None = None

    def __repr__(self) -> str:
        url = redact_url(self.download_url) if self.download_url else None
        return (
            f"JobStatus(status={self.status!r}, model_id={self.model_id!r}, message={self.message!r},"
            f" download_url={url!r})"
        )


@dataclass(slots=True)
class UploadMeter:
    """Bytes of a PUT's body handed to the connection so far, for whoever reports its progress."""

    sent: int = 0


class _FilePayload(aiohttp.payload.Payload):
    """Streams ``size`` bytes of a file with a Content-Length, checking their sha256 before the last chunk goes out.

    Object stores refuse chunked presigned PUTs, so the size is declared. Holding back the final chunk until the
    digest matches means a file that changed since it was checked never completes a PUT (and never costs a retraining).
    With ``check``, every chunk read is also handed to that check (one pass over the bytes), and the final chunk waits
    for its verdict too: a file that fails its check is cut before its last byte.
    """

    def __init__(
        self,
        path: Path,
        size: int,
        sha256: str,
        on_progress: Callable[[], object] | None = None,
        throttle: TokenBucket | None = None,
        meter: UploadMeter | None = None,
        check: StreamCheck[Any] | None = None,
    ) -> None:
        super().__init__(path)
        self._check = check
        self._meter = meter
        self._throttle = throttle
        self._path = path
        self._length = size
        self._size = size
        self._sha256 = sha256
        self._on_progress = on_progress
        self.sent = 0
        # Set before the last byte is handed to the socket, never after: once it may have left, the upload may be
        # whole on the far side, whatever happens to this connection next.
        self.last_byte_handed_over = size == 0
        self.transport: asyncio.Transport | None = None

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file payload is not text")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        # Never replayable: aiohttp silently re-sends an idempotent request whose connection dropped unless its
        # body is consumed, and a second completed PUT is a second paid retraining. The runner decides instead.
        self._consumed = True
        self.transport = getattr(writer, "transport", None)
        digest = hashlib.sha256()
        remaining = self._length
        held: bytes = b""
        try:
            f: _Reader = (
                _InlineFile(self._path) if self._length <= _INLINE_READ_MAX else await aiofiles.open(self._path, "rb")
            )
        except OSError as e:  # the file was removed or replaced since it was checked: check it again
            msg = f"{self._path.name} cannot be read any more ({e.strerror}); upload aborted"
            raise SourceChanged(msg) from e
        check = self._check
        try:
            if check is not None:
                check.start()
            while remaining > 0:
                chunk = await f.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                if len(chunk) < _THREAD_HASH_MIN:
                    digest.update(chunk)
                    hashing = None
                else:  # hash in a thread (hashlib releases the GIL) while the previous chunk goes out
                    hashing = asyncio.ensure_future(asyncio.to_thread(digest.update, chunk))
                # The check reads this chunk in its own thread while the previous one goes out.
                feeding = None if check is None else asyncio.ensure_future(check.feed(chunk))
                try:
                    if held:
                        await self._send(writer, held, last=False)
                finally:
                    if hashing is not None:
                        await hashing
                    if feeding is not None:
                        await feeding  # raises InputError: the file failed its check, the last chunk stays here
                held = chunk
            if remaining != 0 or digest.hexdigest() != self._sha256 or await f.read(1):
                msg = f"{self._path.name} changed after it was checked; upload aborted before completion"
                raise SourceChanged(msg)
            if check is not None:
                await check.verdict()
        finally:
            await f.close()
            if check is not None:
                await check.close()
        if held:
            await self._send(writer, held, last=True)

    async def _send(self, writer: AbstractStreamWriter, data: bytes, *, last: bool) -> None:
        view = memoryview(data)
        start = 0
        while start < len(view):
            if self._throttle is None:
                piece = view[start : start + _SLICE]
            else:  # the shared cap: may wait, and raises WindowClosed to cut the body before its last byte
                piece = view[start : start + self._throttle.piece(_SLICE)]
                await self._throttle.take(len(piece))
            start += len(piece)
            if last and start >= len(view):
                self.last_byte_handed_over = True
            await writer.write(piece)
            self.sent += len(piece)
            if self._meter is not None:
                self._meter.sent = self.sent
            if self._on_progress is not None:
                self._on_progress()


class _Reader(Protocol):
    async def read(self, size: int) -> bytes: ...

    async def close(self) -> None: ...


class _InlineFile:
    """A small body's file, read on the event loop behind the same awaitable calls as aiofiles' thread-backed one."""

    def __init__(self, path: Path) -> None:
        # Never blocks the loop on what replaced the file: a FIFO would hold open() until a writer came (found by
        # review: the whole daemon stood still). O_NONBLOCK makes that open return; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file any more")
            self._file = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    async def read(self, size: int) -> bytes:
        return self._file.read(size)

    async def close(self) -> None:
        self._file.close()


class _Watchdog:
    """Cancels the task it is entered in once nothing has moved either way for ``idle_s``.

    Moving is: a body slice taken by the socket or an answer byte read (:meth:`progress`), or the kernel's send queue
    changing size. The last one matters because the socket takes a new slice only after about half its send buffer
    (megabytes) has drained: on a slow link that is minutes of real progress the writes alone would not show.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.payload: _FilePayload | None = None
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._queued: int | None = None
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._cancelling = 0
        self._fired = False

    def progress(self) -> None:
        self._last = self._loop.time()

    def fired(self) -> bool:
        """Whether the cancellation being handled is this watchdog's (and not someone else's)."""
        return self._fired and self._task is not None and self._task.uncancel() <= self._cancelling

    def __enter__(self) -> _Watchdog:
        self._task = asyncio.current_task()
        assert self._task is not None
        self._cancelling = self._task.cancelling()
        self._last = self._loop.time()
        self._handle = self._loop.call_later(self.idle_s / 4, self._check)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        queued = _send_queue(self.payload.transport if self.payload is not None else None)
        if queued is not None and queued != self._queued:
            self._queued = queued
            self._last = now
        if now - self._last >= self.idle_s:
            self._fired = True
            assert self._task is not None
            self._task.cancel()
            return
        self._handle = self._loop.call_later(self.idle_s / 4, self._check)


def _send_queue(transport: asyncio.Transport | None) -> int | None:
    """Bytes the kernel still holds to send on ``transport``'s socket (Linux SIOCOUTQ), or None if unknown."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # TIOCOUTQ is SIOCOUTQ on a socket
    except (OSError, ValueError):
        return None
    return int(struct.unpack("i", raw)[0])



class Client:
    """One Prediction One API endpoint set. Pass ``session`` to share a connection pool (tests, many models)."""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 60.0,
        upload_read_timeout_s: float = 300.0,
        throttle: TokenBucket | None = None,
        network: Network | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self.network = network or Network()  # proxy and CAs, per request: a reload may replace them
        self._throttle = throttle  # shared by every PUT body of this client; API calls are not throttled
        self._session = session
        self._owns_session = session is None
        self._api_timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)
        # A PUT's silence is bounded by its progress watchdog: aiohttp's read timeout would count the minutes a slow
        # link spends draining the kernel's send buffer after the last write as silence.
        self._upload_idle_s = upload_read_timeout_s
        self._put_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        self._download_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=upload_read_timeout_s
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # The upload URL is a credential for whatever host it names: never send our headers along a redirect.
            self._session = aiohttp.ClientSession(raise_for_status=False, auto_decompress=True)
        return self._session

    def _via(self, url: URL) -> dict[str, Any]:
        return self.network.request_options(url)

    async def _transport_error(
        self, endpoint: str, error: aiohttp.ClientError, url: URL, *, body_complete: bool = True
    ) -> TransportError:
        """A typed error that names the hop that failed: the proxy, its credentials, DNS, TLS or the server."""
        if isinstance(error, aiohttp.ClientHttpProxyError) and error.status == 407:
            route = self.network.route(url)
            return ProxyAuthFailed(endpoint, route.proxy, route.source)
        detail = await describe_failure(error, url, self.network, self._api_timeout.sock_connect or 10.0)
        return TransportError(endpoint, detail, body_complete=body_complete)

    def _proxy_answered_407(self, endpoint: str, resp: aiohttp.ClientResponse, url: URL) -> None:
        # A plain-http target through a proxy: the 407 comes as the request's own answer, not as a CONNECT failure.
        route = self.network.route(url)
        if resp.status == 407 and route.proxy is not None:
            raise ProxyAuthFailed(endpoint, route.proxy, route.source)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def request_upload(self, api_key: str, filename: str) -> UploadTicket:
        """Step 1: ``GET upload_url?filename=...`` — creates a remote job and returns its presigned URL."""
        query = "filename=" + urllib.parse.quote(filename, safe="")
        url = URL(f"{self._base}{_API}/upload_url?{query}", encoded=True)
        body = await self._api_call("upload_url", "GET", url, api_key)
        job_id, upload_url = body.get("retrain_job_id"), body.get("upload_url")
        if not isinstance(job_id, str | int) or not isinstance(upload_url, str) or not upload_url.startswith("http"):
            raise ApiError("upload_url", 200, message=f"unexpected response shape (keys: {sorted(body)})")
        return UploadTicket(str(job_id), upload_url)

    async def get_status(self, api_key: str, retrain_job_id: str) -> JobStatus:
        """Retrain Status Check. Never creates a job, so it is also how a key is proven."""
        url = URL(f"{self._base}{_API}/{urllib.parse.quote(retrain_job_id, safe='')}", encoded=True)
        body = await self._api_call("status", "GET", url, api_key)
        status = body.get("status")
        if not isinstance(status, str):
            raise ApiError("status", 200, message=f"unexpected response shape (keys: {sorted(body)})")
        model_id = body.get("model_id")
        message = body.get("message")
        download = body.get("download_url")
        return JobStatus(
            status=status,
            model_id=model_id if isinstance(model_id, int) else None,
            message=message if isinstance(message, str) else None,
            download_url=download if isinstance(download, str) else None,
        )

    async def switch_model(self, api_key: str, retrain_job_id: str) -> None:
        """Retrain Model Switch: publish the retrained model."""
        url = URL(f"{self._base}{_API}/{urllib.parse.quote(retrain_job_id, safe='')}/update_model", encoded=True)
        await self._api_call("switch", "PUT", url, api_key)

    async def put_file(
        self,
        upload_url: str,
        path: Path,
        *,
        size: int,
        sha256: str,
        meter: UploadMeter | None = None,
        check: StreamCheck[Any] | None = None,
    ) -> None:
        """Step 2: PUT the file to ``upload_url`` exactly as received, streamed, with a Content-Length.

        A progress watchdog bounds silence, not the upload: no body bytes taken by the socket and no answer bytes
        read for ``upload_read_timeout_s`` aborts the attempt with :class:`UploadStalled`. (aiohttp's own read
        timeout does not run while the body is being sent, so a storage node that stops reading held the PUT until
        the kernel gave up, about 15 minutes.)

        With ``check`` the file is checked as it is sent, and the last byte leaves only once the check has passed:
        a file that fails raises the check's :class:`~.checks.InputError`, cut before its last byte (nothing arrived).
        """
        watchdog = _Watchdog(self._upload_idle_s)
        payload = _FilePayload(path, size, sha256, watchdog.progress, self._throttle, meter, check)
        watchdog.payload = payload
        url = URL(upload_url, encoded=True)
        try:
            with watchdog:
                async with self.session.put(
                    url,
                    data=payload,
                    headers={"Content-Length": str(size)},
                    # Like the manual's curl and requests examples: no Content-Type, which a signature may not cover.
                    skip_auto_headers=("Content-Type",),
                    timeout=self._put_timeout,
                    allow_redirects=False,
                    **self._via(url),
                ) as resp:
                    watchdog.progress()
                    self._proxy_answered_407("put", resp, url)
                    if resp.status >= 300:
                        error = await _put_error(resp)
                        error.body_complete = payload.last_byte_handed_over
                        raise error
                    async for _ in resp.content.iter_any():
                        watchdog.progress()
        except asyncio.CancelledError:
            if not watchdog.fired():
                raise
            if payload.transport is not None:
                payload.transport.abort()  # not close(): that would go on flushing buffered body bytes
            raise UploadStalled(
                self._upload_idle_s, sent=payload.sent, size=size, body_complete=payload.last_byte_handed_over
            ) from None
        except (SourceChanged, InputError):
            raise
        except WindowClosed:
            raise UploadCut(sent=payload.sent, size=size) from None
        except aiohttp.ClientError as e:
            if isinstance(e.__cause__, SourceChanged | InputError):
                raise e.__cause__ from None
            if isinstance(e.__cause__, WindowClosed):
                if payload.transport is not None:
                    payload.transport.abort()  # nothing more of this body may leave
                raise UploadCut(sent=payload.sent, size=size) from None
            raise await self._transport_error("put", e, url, body_complete=payload.last_byte_handed_over) from None
        except TimeoutError:
            detail = "timed out waiting for the storage server"
            raise TransportError("put", detail, body_complete=payload.last_byte_handed_over) from None

    async def download(
        self, url: str, dest: Path, *, max_bytes: int | None = None, part: Path | None = None
    ) -> int:
        """Stream ``url`` into ``dest``; returns the byte count.

        Redirects are followed only to https or to the same origin (``redirect_allowed``): a refused one is a
        ``TransportError`` and nothing is written. The body goes to a hidden ``.part`` name, removed on any error.
        No progress for ``upload_read_timeout_s`` aborts it; more than ``max_bytes`` raises :class:`ResultTooLarge`.

        ``part``: the hidden name to write (beside ``dest``), left there when complete for the caller to record
        ``dest`` and then move it (see ``RetrainTracker._download``). Without it, ``.DEST.part``, renamed to ``dest``.
        """
        origin = target = URL(url, encoded=True)
        try:
            for _ in range(_MAX_REDIRECTS + 1):
                async with self.session.get(
                    target, timeout=self._download_timeout, allow_redirects=False, **self._via(target)
                ) as resp:
                    self._proxy_answered_407("download", resp, target)
                    if resp.status in _REDIRECT_STATUSES and "Location" in resp.headers:
                        target = _next_hop(origin, target, resp.headers["Location"])
                        continue
                    if resp.status >= 300:
                        raise await _put_error(resp, endpoint="download")
                    if max_bytes is not None and (resp.content_length or 0) > max_bytes:
                        raise ResultTooLarge(f"the result is {resp.content_length} bytes, over max_result_bytes")
                    return await _save(resp, dest, max_bytes, part)
        except aiohttp.ClientError as e:
            raise await self._transport_error("download", e, target) from None
        raise TransportError("download", f"more than {_MAX_REDIRECTS} redirects from {redact_url(str(origin))}")

    async def _api_call(self, endpoint: str, method: str, url: URL, api_key: str) -> dict[str, Any]:
        try:
            async with self.session.request(
                method,
                url,
                headers={"x-api-key": api_key},
                timeout=self._api_timeout,
                allow_redirects=False,
                **self._via(url),
            ) as resp:
                self._proxy_answered_407(endpoint, resp, url)
                text = await resp.text(errors="replace")
                if resp.status >= 300:
                    raise _api_error(endpoint, resp, text, api_key)
        except aiohttp.ClientError as e:
            raise await self._transport_error(endpoint, e, url) from None
        except TimeoutError:
            raise TransportError(endpoint, "timed out waiting for the API") from None
        try:
            body = json.loads(text)
        except ValueError:
            raise ApiError(
                endpoint, resp.status, message=f"response is not JSON: {_excerpt(text, api_key)!r}"
            ) from None
        if not isinstance(body, dict):
            raise ApiError(endpoint, resp.status, message=f"response is not a JSON object: {_excerpt(text, api_key)!r}")
        return body


_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def redirect_allowed(origin: URL, target: URL) -> bool:
    """Whether a result download may follow a redirect from ``origin`` to ``target``: https, or the same origin."""
    if target.scheme == "https":
        return True
    return (target.scheme, target.host, target.port) == (origin.scheme, origin.host, origin.port)


def _next_hop(origin: URL, current: URL, location: str) -> URL:
    target = current.join(URL(location, encoded=True))
    if not redirect_allowed(origin, target):
        detail = (
            f"refused a redirect from {redact_url(str(origin))} to {redact_url(str(target))}:"
            " result downloads follow redirects only to https or to the same host"
        )
        raise TransportError("download", detail)
    return target


async def _save(
    resp: aiohttp.ClientResponse, dest: Path, max_bytes: int | None = None, keep: Path | None = None
) -> int:
    """Write the body under a hidden name, renamed to ``dest`` when complete and removed on any error; or, with
    ``keep``, written there and left there when complete (see ``Client.download``)."""
    # The same name on every attempt: a killed run's is overwritten.
    part = keep if keep is not None else dest.with_name(f".{dest.name}.part")
    total = 0
    try:
        # A plain file closed in `finally`: an awaited close could be skipped when the task is cancelled.
        with open(part, "wb") as f:  # noqa: ASYNC230 -- each write goes to a thread below
            async for chunk in resp.content.iter_chunked(_CHUNK):
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise ResultTooLarge(f"the result is over max_result_bytes ({max_bytes} bytes)")
                await asyncio.to_thread(f.write, chunk)
        if keep is None:
            part.replace(dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return total


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After")
    return None if value is None else parse_retry_after(value, datetime.now(UTC))


def _api_error(endpoint: str, resp: aiohttp.ClientResponse, text: str, api_key: str) -> ApiError:
    code: int | None = None
    error: str | None = None
    message = ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        raw_code = body.get("code")
        if isinstance(raw_code, int) or (isinstance(raw_code, str) and raw_code.isdigit()):
            code = int(raw_code)
        if isinstance(body.get("error"), str):
            error = body["error"]
        if isinstance(body.get("message"), str):
            message = body["message"]
    if not message:
        message = _excerpt(text, api_key) or resp.reason or "no body"
    return ApiError(
        endpoint,
        resp.status,
        code=code,
        error=error,
        message=scrub(message, [api_key]),
        retry_after=_retry_after(resp),
    )


_XML_TAG = re.compile(r"<(Code|Message)>([^<]{0,300})</\1>")


async def _put_error(resp: aiohttp.ClientResponse, endpoint: str = "put") -> ApiError:
    # S3-style error bodies can echo the signed request: keep only <Code> and <Message>.
    text = (await resp.content.read(_MAX_ERROR_BODY)).decode("utf-8", "replace")
    fields = dict(_XML_TAG.findall(text))
    message = fields.get("Message") or resp.reason or "no message"
    return ApiError(
        endpoint, resp.status, error=fields.get("Code"), message=scrub(message), retry_after=_retry_after(resp)
    )


def _excerpt(text: str, api_key: str) -> str:
    flat = " ".join(text.split())
    return scrub(flat[:200] + ("…" if len(flat) > 200 else ""), [api_key])
