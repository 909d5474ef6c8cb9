"""Checking a file while it is being sent: the bytes a PUT reads are handed to a check running in a worker thread.

The check (``checks.check_csv_stream``) pulls its bytes; the PUT pushes them. A bounded queue joins the two, so
memory stays flat and a slow check slows the PUT instead of piling up chunks. The PUT holds its last chunk back until
:meth:`StreamCheck.verdict` has returned, so a file that fails its check never completes a PUT.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .checks import open_regular
from .client import SourceChanged

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["StreamCheck"]

T = TypeVar("T")
_DEPTH = 4  # chunks (1 MiB each) queued ahead of the check at most
_END = b""


class _Stopped(Exception):
    """The PUT ended before the check had all the bytes: the check thread gives up quietly."""


class StreamCheck(Generic[T]):
    """Runs ``check(raw)`` in a worker thread on the bytes :meth:`feed` receives, in order.

    ``raw`` is a readable stream; it can also be sought back to its start once all bytes were fed (a CSV that is
    not UTF-8 is parsed a second time as cp932): that second reading comes from ``path`` and must hash to ``sha256``,
    or the check fails with :class:`SourceChanged`.
    """

    def __init__(self, check: Callable[[io.RawIOBase], T], *, path: Path, sha256: str) -> None:
        self._check = check
        self._path = path
        self._sha256 = sha256
        self._queue: asyncio.Queue[bytes] | None = None
        self._future: asyncio.Future[T] | None = None
        self._stop = threading.Event()
        self._reader: _QueueReader | None = None
        self.result: T | None = None  # the check's result, once verdict() has returned

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(_DEPTH)
        self._reader = _QueueReader(self._queue, loop, self._stop, self._path, self._sha256)
        self._future = asyncio.ensure_future(asyncio.to_thread(self._check, self._reader))

    async def feed(self, chunk: bytes) -> None:
        """Hand the next chunk to the check; raises the check's error at once if it has already failed."""
        assert self._queue is not None
        assert self._future is not None
        if not chunk:
            return
        if self._future.done():
            self._future.result()  # raises the check's error (the file is bad: cut the PUT now)
        if not self._queue.full():
            self._queue.put_nowait(chunk)
            return
        put: asyncio.Future[Any] = asyncio.ensure_future(self._queue.put(chunk))
        done, _ = await asyncio.wait([put, self._future], return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
        if self._future.done() and self._future.exception() is not None:
            self._future.result()  # raises the check's error (the file is bad: cut the PUT now)

    async def verdict(self) -> T:
        """All bytes were fed: wait for the check's result (raises its error)."""
        assert self._queue is not None
        assert self._future is not None
        if not self._future.done():
            put: asyncio.Future[Any] = asyncio.ensure_future(self._queue.put(_END))
            await asyncio.wait([put, self._future], return_when=asyncio.FIRST_COMPLETED)
            if not put.done():
                put.cancel()
        result = await self._future
        assert self._reader is not None
        if not self._reader.ended:  # a verdict on part of the bytes is no verdict
            raise RuntimeError("the check returned before it had read every byte")
        self.result = result
        return result

    async def close(self) -> None:
        """The PUT is over (whatever happened): stop the check thread and wait for it, swallowing its outcome."""
        if self._future is None or self._queue is None:
            return
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)  # wakes a thread waiting for a chunk
        await asyncio.wait({self._future})
        if not self._future.cancelled():
            self._future.exception()  # retrieved: an error the PUT did not wait for is not logged as unhandled


class _QueueReader(io.RawIOBase):
    """The check's side of the queue; reading blocks the worker thread, never the event loop."""

    def __init__(self, queue: asyncio.Queue[bytes], loop: asyncio.AbstractEventLoop, stop: threading.Event,
                 path: Path, sha256: str) -> None:
        super().__init__()
        self._queue, self._loop, self._stop = queue, loop, stop
        self._path, self._sha256 = path, sha256
        self._rest = b""
        self.ended = False
        self._replay: io.RawIOBase | None = None
        self._replay_hash = hashlib.sha256()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if offset != 0 or whence != io.SEEK_SET or not self.ended:
            raise io.UnsupportedOperation("a streamed check can only go back to the start, after the end")
        # The second reading comes from the file; its digest must match what was sent (checked at its end).
        self._replay = open_regular(self._path)  # type: ignore[assignment]
        self._pos = 0
        return 0

    def read(self, size: int = -1) -> bytes:
        if self._replay is not None:
            data = self._replay.read(size if size > 0 else 1 << 20) or b""
            self._replay_hash.update(data)
            if not data and self._replay_hash.hexdigest() != self._sha256:
                raise SourceChanged(f"{self._path.name} changed while it was being checked")
            return data
        if not self._rest and not self.ended:
            if self._stop.is_set():
                raise _Stopped
            chunk = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
            if self._stop.is_set():
                raise _Stopped
            if chunk == _END:
                self.ended = True
            self._rest = chunk
        n = len(self._rest) if size is None or size < 0 else min(size, len(self._rest))
        data, self._rest = self._rest[:n], self._rest[n:]
        self._pos += len(data)
        return data

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer)
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._replay is not None:
            self._replay.close()
        super().close()

