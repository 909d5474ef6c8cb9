"""Two holes an adversarial review found in the per-file CPU changes, each test failing before its fix: secrets in
values the JSON rendering escapes once more (the per-value scrub is back, before the line scrub), and a small PUT
body replaced by a FIFO freezing the event loop on open() (now opened non-blocking, regular files only)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from retrain_uploader.client import Client, SourceChanged
from retrain_uploader.emulator import Emulator

from .conftest import KEYS

KEY = next(iter(KEYS))


@pytest.fixture
async def client(emulator: Emulator):
    c = Client(emulator.base_url, request_timeout_s=2, upload_read_timeout_s=2)
    yield c
    await c.close()


async def test_a_small_body_replaced_by_a_fifo_does_not_block_the_event_loop(
    client: Client, emulator: Emulator, tmp_path: Path
) -> None:
    # Checked as a 4 KiB regular file, then replaced by a FIFO nobody writes to (or a file on a hung mount) before
    # its PUT. _InlineFile's open() on the loop blocks until a writer comes: the whole daemon (heartbeat, watchdog,
    # SIGTERM, every other upload) stops. Before, aiofiles.open blocked one thread and the loop went on.
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


_LOGGING_SCRIPT = r'''
import json, sys
from pathlib import Path
import structlog
from retrain_uploader.logs import configure
from retrain_uploader.redact import register_secret
configure(level="info", file=Path(sys.argv[1]))
register_secret('pr\\ox"y')  # a proxy password with a backslash and a quote, as network.py registers it
log = structlog.get_logger("retrain_uploader")
# A JSON-escaped body excerpt inside an exception message (a storage node's JSON error quoted by another layer)
log.error("upload.failed", error='body: {\\"X-Amz-Credential\\":\\"AKIAEXAMPLEKEY\\"}')
# The registered password in its repr / JSON spelling (e.g. a repr of the proxy URL in an error)
log.error("proxy.failed", error=json.dumps("http://u:" + 'pr\\ox"y' + "@proxy:3128"))
# A header dump with a tab after the colon
log.error("upload.failed", error="x-amz-security-token:\tFwoGZXIvYXdzTOKEN")
'''


@pytest.mark.parametrize("leak", ["AKIAEXAMPLEKEY", "u:pr", "FwoGZXIvYXdzTOKEN"])
def test_values_a_per_value_scrub_caught_are_scrubbed_in_the_rendered_line(tmp_path: Path, leak: str) -> None:
    # feat/percost dropped redact.structlog_processor (each value scrubbed before rendering) and scrubs only the
    # rendered JSON line. Rendering escapes `"`, `\` and tabs once more, and the patterns and a registered secret's
    # spellings stop matching: these three were scrubbed before and reach the log file (and stderr/journal) now.
    import subprocess
    import sys

    log = tmp_path / "daemon.log"
    subprocess.run([sys.executable, "-c", _LOGGING_SCRIPT, str(log)], check=True, timeout=30, capture_output=True)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 3
    text = log.read_text()
    assert leak not in text, text  # "u:pr": the password right after its user
