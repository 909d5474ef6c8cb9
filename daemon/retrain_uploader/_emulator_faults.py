"""Emulator faults: validated specs, a FIFO queue per endpoint, how each is applied, and the error bodies."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import structlog
from aiohttp import web

log = structlog.get_logger("retrain_uploader.emulator")

ENDPOINTS = frozenset({"upload_url", "put", "status", "switch", "result"})
JSON_ENDPOINTS = frozenset({"upload_url", "status", "switch"})  # the API proper; the rest is object storage
_PARAMS: dict[str, frozenset[str]] = {
    "http_status": frozenset({"status", "retry_after", "body", "content_type", "after_body"}),
    "slow": frozenset({"delay_s"}),
    "hang": frozenset(),
    "drop": frozenset({"after_body"}),
    "expire": frozenset(),
    "malformed": frozenset(),
    "wrong_shape": frozenset(),
}
_ONLY_ON: dict[str, frozenset[str]] = {
    "expire": frozenset({"upload_url"}),
    "malformed": JSON_ENDPOINTS,
    "wrong_shape": JSON_ENDPOINTS,
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Exchange:
    """Per-request state shared by middleware, fault and handler (aiohttp runs each request in its own task)."""

    expire: bool = False
    dropped: bool = False
    job_id: str | None = None


EXCHANGE: ContextVar[Exchange] = ContextVar("emulator_exchange")


@dataclass(frozen=True)
class Fault:
    """One queued misbehaviour of one endpoint."""

    endpoint: str
    kind: str
    params: dict[str, Any]


def make_fault(endpoint: str, kind: str, params: dict[str, Any]) -> Fault:
    """Validate a fault spec; raises ValueError naming what is wrong."""
    if endpoint not in ENDPOINTS:
        msg = f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}"
        raise ValueError(msg)
    if kind not in _PARAMS:
        msg = f"unknown fault kind {kind!r}; expected one of {sorted(_PARAMS)}"
        raise ValueError(msg)
    if endpoint not in _ONLY_ON.get(kind, ENDPOINTS):
        msg = f"fault {kind!r} does not apply to endpoint {endpoint!r}"
        raise ValueError(msg)
    if unknown := set(params) - _PARAMS[kind]:
        msg = f"fault {kind!r} takes no parameter(s) {sorted(unknown)}"
        raise ValueError(msg)
    if "after_body" in params and endpoint != "put":
        msg = "after_body applies to the 'put' endpoint only"
        raise ValueError(msg)
    if kind == "http_status" and not _is_int_in(params.get("status"), 200, 599):
        msg = "http_status needs status=<int 200..599>"
        raise ValueError(msg)
    if kind == "slow" and not _is_number_at_least(params.get("delay_s"), 0):
        msg = "slow needs delay_s=<seconds >= 0>"
        raise ValueError(msg)
    return Fault(endpoint, kind, dict(params))


def _is_int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number_at_least(value: object, low: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= low


@dataclass
class _Entry:
    fault: Fault
    remaining: int


class FaultQueue:
    """Faults waiting per endpoint; each request at that endpoint consumes one use of the oldest."""

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[_Entry]] = collections.defaultdict(collections.deque)

    def push(self, fault: Fault, times: int) -> None:
        if not _is_int_in(times, 1, 1_000_000):
            msg = "times must be a positive int"
            raise ValueError(msg)
        self._queues[fault.endpoint].append(_Entry(fault, times))

    def pop(self, endpoint: str) -> Fault | None:
        queue = self._queues.get(endpoint)
        if not queue:
            return None
        entry = queue[0]
        entry.remaining -= 1
        if entry.remaining == 0:
            queue.popleft()
        return entry.fault

    def clear(self) -> None:
        self._queues.clear()


async def apply_fault(
    fault: Fault, request: web.Request, handler: Handler, stopping: asyncio.Event
) -> web.StreamResponse:
    """Answer `request` as `fault` says, calling `handler` where the fault still lets it be served."""
    log.info("emulator.fault_applied", endpoint=fault.endpoint, kind=fault.kind)
    match fault.kind:
        case "slow":
            await pause(stopping, fault.params["delay_s"])
        case "hang":
            await stopping.wait()
            return _drop(request)
        case "drop" if fault.endpoint == "put" and fault.params.get("after_body", True):
            with contextlib.suppress(web.HTTPException):
                await handler(request)  # the upload is received and recorded; only the answer is lost
            return _drop(request)
        case "drop":
            if fault.endpoint == "put":
                await request.content.readany()
            return _drop(request)
        case "expire":
            EXCHANGE.get().expire = True
        case "malformed":
            return web.Response(text="<html>oops", content_type="text/html")
        case "wrong_shape":
            return web.json_response({"id": 1})
        case "http_status" if fault.endpoint == "put" and fault.params.get("after_body"):
            with contextlib.suppress(web.HTTPException):
                await handler(request)  # the upload is received and recorded; a gateway then answers an error
            return http_status_response(fault)
        case _:
            return http_status_response(fault)
    return await handler(request)


def _drop(request: web.Request) -> web.StreamResponse:
    EXCHANGE.get().dropped = True
    if request.transport is not None:
        request.transport.abort()
    # aiohttp fails to write this to the aborted transport and handles that as a client disconnect.
    return web.Response()


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if the emulator is stopping."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)


def api_error_body(
    message: str, *, code: int = 4001000204, error: str = "PREDA_EXTERNAL_BAD_REQUEST"
) -> dict[str, Any]:
    return {"code": code, "error": error, "message": message}


def api_error(message: str) -> web.HTTPBadRequest:
    """The API's documented error answer (its HTTP status is undocumented; 400 is the best guess)."""
    return web.HTTPBadRequest(text=json.dumps(api_error_body(message)), content_type="application/json")


def s3_error(status: int, code: str, message: str) -> web.Response:
    """An object-store style XML error, as a presigned-URL PUT would get it."""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        "<RequestId>EMULATOR</RequestId></Error>"
    )
    return web.Response(status=status, text=xml, content_type="application/xml")


def http_status_response(fault: Fault) -> web.Response:
    """The answer for an `http_status` fault: the given body, else one shaped like the endpoint's errors."""
    params = fault.params
    status: int = params["status"]
    if "body" in params:
        response = web.Response(status=status, text=str(params["body"]), content_type="text/plain")
    elif fault.endpoint in JSON_ENDPOINTS:
        body = api_error_body("Emulated server error.", code=5001000201, error="PREDA_EXTERNAL_INTERNAL_SERVER_ERROR")
        response = web.json_response(body, status=status)
    else:
        code = "SlowDown" if status == 503 else "InternalError"
        response = s3_error(status, code, "Emulated server error.")
    if "content_type" in params:
        response.headers["Content-Type"] = str(params["content_type"])
    if "retry_after" in params:
        response.headers["Retry-After"] = str(params["retry_after"])
    return response
