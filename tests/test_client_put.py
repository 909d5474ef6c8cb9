"""The PUT's progress watchdog over real loopback sockets: a storage node that stops reading, or never answers, costs
``upload_read_timeout_s``, not the kernel's 15 minutes; one that is slow but moving is left alone."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from retrain_uploader.client import Client, TransportError, UploadStalled
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import AFTER_UPLOAD
from retrain_uploader.policy import RenewUrl, Retry, classify

from .conftest import Daemon, drop

IDLE_S = 0.5
# Well above what the two kernels' socket buffers on loopback take in before the sender blocks (about 3 MB here).
BIG = 16 << 20
Server = Callable[..., Awaitable[str]]


def body(tmp_path: Path, size: int) -> tuple[Path, str]:
    path = tmp_path / "body.csv"
    data = (b"a,b\n" + b"1,2\n" * (size // 4))[:size]
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
async def serve() -> AsyncIterator[Server]:
    """A raw TCP server on 127.0.0.1 (with a tiny receive buffer unless told); its one connection goes to ``handle``."""
    listeners: list[socket.socket] = []
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def start(
        handle: Callable[[socket.socket], Awaitable[None]], *, small_buffer: bool = True, rcvbuf: int | None = None
    ) -> str:
        listener = socket.socket()
        if rcvbuf is not None or small_buffer:  # inherited by accepted sockets
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf or 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        listeners.append(listener)

        async def accept() -> None:
            conn, _ = await loop.sock_accept(listener)
            with conn:
                await handle(conn)

        tasks.add(asyncio.create_task(accept()))
        return f"http://127.0.0.1:{listener.getsockname()[1]}/bucket/key?X-Amz-Signature=secret"

    yield start
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for listener in listeners:
        listener.close()


async def _closed_by_peer(conn: socket.socket) -> bool:
    """Drain ``conn`` until the peer closes it (True) or it stays open for 2 s (False)."""
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    try:
        async with asyncio.timeout(2):
            while await loop.sock_recv(conn, 1 << 20):
                pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def test_a_storage_node_that_stops_reading_is_cut_off_after_the_idle_timeout(
    serve: Server, tmp_path: Path
) -> None:
    gone = asyncio.get_running_loop().create_future()

    async def never_read(conn: socket.socket) -> None:
        await asyncio.sleep(IDLE_S * 4)  # reads nothing while the client waits
        gone.set_result(await _closed_by_peer(conn))

    url = await serve(never_read)
    path, digest = body(tmp_path, BIG)
    client = Client("http://127.0.0.1:9", upload_read_timeout_s=IDLE_S)
    started = time.monotonic()
    try:
        with pytest.raises(UploadStalled) as info:
            await asyncio.wait_for(client.put_file(url, path, size=BIG, sha256=digest), 10)  # hung for ~15 min
    finally:
        await client.close()
    elapsed = time.monotonic() - started
    assert IDLE_S <= elapsed < IDLE_S + 1.5
    stalled = info.value
    assert (stalled.endpoint, stalled.body_complete) == ("put", False)
    assert 0 < stalled.sent < BIG
    assert "secret" not in str(stalled)
    assert await gone  # the connection was torn down, not left flushing the buffered body
    assert isinstance(classify(stalled), RenewUrl)  # nothing arrived: straight to a fresh URL


async def test_a_storage_node_that_takes_the_body_but_never_answers_is_an_unknown_outcome(
    serve: Server, tmp_path: Path
) -> None:
    size = 200_000
    received = 0

    async def read_all_never_answer(conn: socket.socket) -> None:
        nonlocal received
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        while chunk := await loop.sock_recv(conn, 1 << 16):
            received += len(chunk)

    url = await serve(read_all_never_answer)
    path, digest = body(tmp_path, size)
    client = Client("http://127.0.0.1:9", upload_read_timeout_s=IDLE_S)
    try:
        with pytest.raises(UploadStalled) as info:
            await asyncio.wait_for(client.put_file(url, path, size=size, sha256=digest), 10)
    finally:
        await client.close()
    assert info.value.body_complete is True
    assert info.value.sent == size and received > size  # headers and the whole body
    verdict = classify(info.value)
    assert isinstance(verdict, Retry)  # the runner settles it by the status check, never by a blind second PUT
    assert isinstance(info.value, TransportError)


async def test_a_slow_but_moving_upload_outlives_the_idle_timeout(serve: Server, tmp_path: Path) -> None:
    # 2.5 MB/s: the socket takes a new slice only once about half its send buffer (megabytes) has drained, which
    # takes longer than the idle timeout here; the watchdog sees the kernel's send queue shrink meanwhile.
    size = 4 << 20

    async def slow_reader(conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        data = b""
        while b"\r\n\r\n" not in data:
            data += await loop.sock_recv(conn, 4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        [length] = [int(line.partition(b":")[2]) for line in head.split(b"\r\n") if line.startswith(b"Content-Length")]
        got = len(rest)
        while got < length:
            await asyncio.sleep(0.1)  # a steady trickle, never silent for the idle timeout
            for _ in range(4):
                with contextlib.suppress(BlockingIOError):
                    got += len(conn.recv(64 << 10))
        await loop.sock_sendall(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    # The receiving buffer is bounded (256 KiB, doubled by the kernel): left to autotune, loopback's grows to
    # megabytes, the whole body is soon in it (the sender's queue empty and still), and the reader's tail of more than
    # the idle timeout looks like a server slow to answer (it failed so 1 run in 10). The sender's queue, megabytes,
    # still takes a new slice only rarely: what the watchdog must see is that queue shrinking.
    url = await serve(slow_reader, rcvbuf=256 << 10)
    path, digest = body(tmp_path, size)
    client = Client("http://127.0.0.1:9", upload_read_timeout_s=IDLE_S)
    started = time.monotonic()
    try:
        await asyncio.wait_for(client.put_file(url, path, size=size, sha256=digest), 20)
    finally:
        await client.close()
    assert time.monotonic() - started > IDLE_S * 2  # it really lasted longer than the idle timeout


async def test_the_daemon_gets_a_fresh_url_after_a_stalled_put(
    start_daemon: Callable[..., Awaitable[Daemon]], emulator: Emulator
) -> None:
    emulator.inject("put", "hang")  # takes what its buffers hold, then reads nothing
    d = await start_daemon(api={"upload_read_timeout_s": IDLE_S})
    rows = b"".join(b"%d,%d,basic\n" % (i, i % 90) for i in range(BIG // 12))
    drop(d.inbox(), "big.csv", b"id,age,plan\n" + rows)
    [job] = await d.closed_jobs(1, timeout=30)
    assert job.state in AFTER_UPLOAD
    events = d.events(job.id)
    urls = [e["detail"]["retrain_job_id"] for e in events if e["event"] == "upload_url"]
    [rejected] = [e for e in events if e["event"] == "url_rejected"]
    assert len(urls) == 2 and urls[0] != urls[1]
    assert "no progress for 0.5 s" in rejected["detail"]["error"]
    assert [u.job_id for u in emulator.uploads] == [urls[1]] == [job.retrain_job_id]
