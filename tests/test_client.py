"""The HTTP client against the emulator over loopback: typed results and errors, the exact PUT."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from retrain_uploader.client import ApiError, Client, SourceChanged, TransportError
from retrain_uploader.emulator import Emulator

from .conftest import KEYS, CountingExecutor

KEY = next(iter(KEYS))


@pytest.fixture
async def client(emulator: Emulator):
    c = Client(emulator.base_url, request_timeout_s=2, upload_read_timeout_s=2)
    yield c
    await c.close()


def big_file(tmp_path: Path, size: int = 5 << 20) -> tuple[Path, str]:
    path = tmp_path / "big.csv"
    data = (b"a,b\n" + b"1,2\n" * (size // 4))[:size]
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


async def test_put_streams_the_exact_bytes_with_a_content_length(client: Client, emulator: Emulator,
                                                                 tmp_path: Path) -> None:
    path, digest = big_file(tmp_path)
    ticket = await client.request_upload(KEY, "big.csv")
    await client.put_file(ticket.upload_url, path, size=path.stat().st_size, sha256=digest)
    [upload] = emulator.uploads
    assert (upload.sha256, upload.size, upload.content_length_header) == (digest, path.stat().st_size,
                                                                          path.stat().st_size)
    assert "X-Amz-Signature" not in repr(ticket)  # the URL is a credential: redacted in every repr


async def test_a_digest_mismatch_cuts_the_put_before_its_last_byte(client: Client, emulator: Emulator,
                                                                   tmp_path: Path) -> None:
    path, _ = big_file(tmp_path)
    ticket = await client.request_upload(KEY, "big.csv")
    with pytest.raises(SourceChanged, match="changed after it was checked"):
        await client.put_file(ticket.upload_url, path, size=path.stat().st_size, sha256="0" * 64)
    assert emulator.uploads == []  # the storage never saw a complete body
    assert [r.endpoint for r in emulator.requests].count("put") == 1


async def test_a_file_gone_before_the_put_is_a_source_change(client: Client, tmp_path: Path) -> None:
    ticket = await client.request_upload(KEY, "x.csv")
    with pytest.raises(SourceChanged, match="cannot be read any more"):
        await client.put_file(ticket.upload_url, tmp_path / "missing.csv", size=3, sha256="0" * 64)


async def test_error_bodies_are_parsed_and_odd_ones_still_explained(client: Client, emulator: Emulator) -> None:
    with pytest.raises(ApiError) as info:
        await client.request_upload("no-such-key-1", "x.csv")
    assert (info.value.http_status, info.value.code, info.value.error, info.value.message) == (
        400, 4001000204, "PREDA_EXTERNAL_BAD_REQUEST", "invalid_api_key.")
    emulator.inject("status", "http_status", status=502, body="<html>Bad Gateway</html>", content_type="text/html")
    with pytest.raises(ApiError) as info:
        await client.get_status(KEY, "x")
    assert info.value.http_status == 502 and "Bad Gateway" in info.value.message and info.value.code is None


async def test_nothing_listening_is_a_transport_error(tmp_path: Path) -> None:
    c = Client("http://127.0.0.1:9", connect_timeout_s=1, request_timeout_s=1)
    try:
        with pytest.raises(TransportError, match="upload_url"):
            await c.request_upload(KEY, "x.csv")
    finally:
        await c.close()


async def test_a_small_body_is_sent_without_a_thread_hop(
    client: Client, emulator: Emulator, tmp_path: Path, thread_hops: CountingExecutor
) -> None:
    # Its open, reads and close went to a thread each: about 350 us of CPU for a file of a few KB.
    path, digest = big_file(tmp_path, 4096)
    ticket = await client.request_upload(KEY, "small.csv")
    await client.put_file(ticket.upload_url, path, size=4096, sha256=digest)
    assert thread_hops.submitted == 0
    [upload] = emulator.uploads
    assert (upload.sha256, upload.size, upload.content_length_header) == (digest, 4096, 4096)


@pytest.mark.parametrize("change", ["other bytes", "grown"])
async def test_a_small_body_changed_since_its_check_is_cut_before_its_last_byte(
    client: Client, emulator: Emulator, tmp_path: Path, change: str
) -> None:
    path, digest = big_file(tmp_path, 4096)
    if change == "grown":
        path.write_bytes(path.read_bytes() + b"3,4\n")
    else:
        path.write_bytes(path.read_bytes().replace(b"1,2", b"1,3", 1))
    ticket = await client.request_upload(KEY, "small.csv")
    with pytest.raises(SourceChanged, match="changed after it was checked"):
        await client.put_file(ticket.upload_url, path, size=4096, sha256=digest)
    assert emulator.uploads == []


async def test_a_small_body_replaced_by_a_fifo_does_not_block_the_event_loop(
    client: Client, emulator: Emulator, tmp_path: Path
) -> None:
    # Found by review: checked as a 4 KiB regular file, then replaced by a FIFO nobody writes to before its PUT; the
    # small body's open() on the loop blocked until a writer came, and the whole daemon (heartbeat, watchdog, SIGTERM,
    # every other upload) stood still. It is opened non-blocking and read only while it is a regular file.
    data = b"a,b\n" + b"1,2\n" * 1023
    path = tmp_path / "small.csv"
    digest = hashlib.sha256(data).hexdigest()
    os.mkfifo(path)
    ticket = await client.request_upload(KEY, "small.csv")

    def late_writer() -> None:  # lets the test end either way: a writer after 2 s, which writes nothing
        time.sleep(2.0)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader holds the FIFO open (the daemon never waited on it)
            return
        os.close(fd)

    writer = threading.Thread(target=late_writer, daemon=True)
    writer.start()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.1)
    try:
        with pytest.raises(SourceChanged):
            await client.put_file(ticket.upload_url, path, size=len(data), sha256=digest)
    finally:
        await asyncio.sleep(0.2)  # the ticker records the gap it is in
        tick.cancel()
        writer.join(5)
    assert emulator.uploads == []
    assert max(gaps) < 0.5, f"the event loop stood still for {max(gaps):.2f} s on a FIFO's open"
