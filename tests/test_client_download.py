"""Result downloads: which redirects are followed, and that no partial file is ever left beside the results."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from retrain_uploader.client import Client, TransportError, redirect_allowed
from retrain_uploader.emulator import Emulator

from .conftest import drop, wait_for

BODY = b"prediction,actual\n" + b"1,1\n" * 100_000  # larger than any write buffer: it reaches the disk

Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start aiohttp apps on 127.0.0.1 (free ports); returns each one's ``http://127.0.0.1:PORT``."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def file_server(hits: list[str]) -> web.Application:
    async def result(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=BODY)

    app = web.Application()
    app.router.add_get("/result.csv", result)
    return app


def redirector(location: Callable[[], str]) -> web.Application:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(location())

    app = web.Application()
    app.router.add_get("/r", moved)
    return app


async def test_a_redirect_to_plain_http_on_another_host_is_refused(serve: Serve, tmp_path: Path) -> None:
    hits: list[str] = []
    other = await serve(file_server(hits))
    # "localhost" is another host than "127.0.0.1" for a redirect, though both reach the same loopback server.
    other_host = other.replace("127.0.0.1", "localhost") + "/result.csv?X-Amz-Signature=secret-sig"
    base = await serve(redirector(lambda: other_host))
    client = Client(base, request_timeout_s=2, upload_read_timeout_s=2)
    try:
        with pytest.raises(TransportError, match="refused a redirect") as info:
            await client.download(f"{base}/r", tmp_path / "result.csv")
    finally:
        await client.close()
    assert "secret-sig" not in str(info.value)  # the target's query (a presigned credential) is never shown
    assert hits == [] and os.listdir(tmp_path) == []


async def test_a_redirect_on_the_same_host_is_followed(serve: Serve, tmp_path: Path) -> None:
    hits: list[str] = []
    app = file_server(hits)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/result.csv")

    app.router.add_get("/r", moved)
    base = await serve(app)
    client = Client(base, request_timeout_s=2, upload_read_timeout_s=2)
    try:
        size = await client.download(f"{base}/r", tmp_path / "result.csv")
    finally:
        await client.close()
    assert (size, (tmp_path / "result.csv").read_bytes(), hits) == (len(BODY), BODY, ["/result.csv"])
    assert os.listdir(tmp_path) == ["result.csv"]


@pytest.mark.parametrize(
    ("origin", "target", "allowed"),
    [
        ("http://127.0.0.1:8080/a", "http://127.0.0.1:8080/b", True),  # same origin
        ("http://127.0.0.1:8080/a", "https://cdn.example/b", True),  # https anywhere
        ("https://api.example/a", "https://api.example/b", True),
        ("http://127.0.0.1:8080/a", "http://localhost:8080/b", False),  # another host, plain http
        ("http://127.0.0.1:8080/a", "http://127.0.0.1:8081/b", False),  # another port
        ("https://api.example/a", "http://api.example/b", False),  # a downgrade to plain http
        ("http://127.0.0.1:8080/a", "file:///etc/passwd", False),
        ("http://127.0.0.1:8080/a", "ftp://127.0.0.1:8080/b", False),
    ],
)
def test_which_redirects_are_followed(origin: str, target: str, allowed: bool) -> None:
    assert redirect_allowed(URL(origin), URL(target)) is allowed


async def test_a_body_cut_midway_leaves_no_partial_file(serve: Serve, tmp_path: Path) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(2 * len(BODY))})
        await resp.prepare(request)
        await resp.write(BODY)  # half the promised body, then the connection closes
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_get("/cut.csv", cut)
    base = await serve(app)
    client = Client(base, request_timeout_s=2, upload_read_timeout_s=2)
    try:
        with pytest.raises(TransportError, match="download"):
            await client.download(f"{base}/cut.csv", tmp_path / "result.csv")
    finally:
        await client.close()
    assert os.listdir(tmp_path) == []


async def test_a_result_download_is_not_followed_to_another_host(
    start_daemon, emulator: Emulator, tmp_path: Path
) -> None:
    """Found by review round 3, through the real daemon: a download_url redirecting to plain http on another host
    was followed. It is refused, retried up to max_attempts, then given up (result_path ""), and no file is left."""
    from aiohttp import web

    other_hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{port}/other/result.zip")

    async def other(request: web.Request) -> web.Response:
        other_hits.append(request.host)
        return web.Response(body=b"PK\x05\x06" + b"\0" * 18, content_type="application/zip")

    app = web.Application()
    app.router.add_get("/presigned/result.zip", redirect)
    app.router.add_get("/other/result.zip", other)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        emulator._result_url = lambda job_id: f"http://127.0.0.1:{port}/presigned/result.zip"  # type: ignore[method-assign]
        d = await start_daemon()
        drop(d.inbox(), "churn.csv", "id,age,plan\n1,34,basic\n2,51,premium\n")
        await d.closed_jobs(1)
        await wait_for(lambda: other_hits or any(j.result_path is not None for j in d.jobs()), 20, "a download")
        assert other_hits == [], f"the download followed a redirect to another host: {other_hits}"
        assert [j.result_path for j in d.jobs()] == [""]
        assert [p.name for p in (d.inbox() / "done").iterdir() if "result" in p.name] == []
    finally:
        await runner.cleanup()


async def test_a_partial_result_left_by_a_killed_daemon_is_removed_at_start(
    start_daemon: Callable[..., Awaitable[Any]], make_settings: Callable[..., Any]
) -> None:
    settings = make_settings()
    done = settings.model("alpha").inbox / "done"
    done.mkdir(parents=True)
    part = done / ".churn.result.zip.part"  # what a kill -9 in the middle of a download leaves
    part.write_bytes(b"PK half")
    keep = done / "churn.csv"
    keep.write_text("id,x\n1,2\n")
    await start_daemon(settings)
    assert not part.exists() and keep.exists()
