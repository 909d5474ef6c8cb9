"""Shared fixtures: a real emulator on a loopback port, real folders, a real ledger, the real service."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from retrain_uploader.config import Settings
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import Job, Ledger
from retrain_uploader.service import Service

if TYPE_CHECKING:
    from ._proc import DaemonProcess

KEYS = {"key-alpha-0001": 1, "key-beta-0002": 2}


async def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy (a condition wait with a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    store = tmp_path / "emulator-store"
    store.mkdir()
    async with Emulator(keys=KEYS, store_dir=store) as emu:
        yield emu


@pytest.fixture
def make_settings(tmp_path: Path, emulator: Emulator) -> Callable[..., Settings]:
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "alpha").write_text("key-alpha-0001\n")
    (keys / "beta").write_text("key-beta-0002\n")

    def make(**sections: Any) -> Settings:
        raw: dict[str, Any] = {
            "api": {"base_url": emulator.base_url, "request_timeout_s": 5, "upload_read_timeout_s": 5},
            "ledger": {"path": str(tmp_path / "state" / "ledger.sqlite3")},
            "watch": {"settle_s": 0.05, "rescan_s": 0.5},
            "retry": {
                "base_delay_s": 0.01,
                "max_delay_s": 0.05,
                "max_attempts": 6,
                "paused_retry_s": 0.2,
                "unknown_outcome_wait_s": 0.2,
            },
            "pool": {"workers": 2, "shutdown_grace_s": 5},
            "status": {"poll_s": 0.1, "max_poll_delay_s": 0.5},
            "models": [
                {"name": "alpha", "inbox": str(tmp_path / "inbox" / "alpha"), "api_key_file": str(keys / "alpha")},
                {"name": "beta", "inbox": str(tmp_path / "inbox" / "beta"), "api_key_file": str(keys / "beta")},
            ],
        }
        for section, values in sections.items():
            if section == "models":
                raw["models"] = values
            else:
                raw.setdefault(section, {}).update(values)
        return Settings.from_mapping(raw)

    return make


class Daemon:
    """A running in-process service plus the helpers tests need to watch it."""

    def __init__(self, service: Service, task: asyncio.Task[int]) -> None:
        self.service = service
        self.task = task
        self.settings = service.settings

    def inbox(self, model: str = "alpha") -> Path:
        return self.settings.model(model).inbox

    def jobs(self) -> list[Job]:
        with Ledger(self.settings.ledger.path) as ledger:
            return ledger.jobs()

    def events(self, job_id: int) -> list[dict[str, Any]]:
        with Ledger(self.settings.ledger.path) as ledger:
            return ledger.events(job_id)

    async def closed_jobs(self, count: int, timeout: float = 15.0) -> list[Job]:
        def done() -> list[Job] | None:
            jobs = self.jobs()
            return jobs if len(jobs) >= count and all(j.closed for j in jobs) else None

        result: list[Job] = await wait_for(done, timeout, f"{count} closed job(s)")
        return result

    async def stop(self) -> int:
        self.service.request_stop()
        return await asyncio.wait_for(self.task, timeout=15)


@pytest.fixture
async def start_daemon(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    daemons: list[Daemon] = []

    async def start(settings: Settings | None = None, **sections: Any) -> Daemon:
        settings = settings or make_settings(**sections)
        service = Service(settings, handle_signals=False)
        task = asyncio.create_task(service.run())
        ready = asyncio.create_task(service.ready.wait())
        await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises the start-up error
        daemon = Daemon(service, task)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if not daemon.task.done():
            await daemon.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, so ENOSPC is the kernel's own (tests may grow it by a remount); skipped where mounting is
    not allowed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to it (each one a thread hop)."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
async def thread_hops() -> AsyncIterator[CountingExecutor]:
    """The running loop's default executor replaced by one that counts what it is handed: a test asserts how many
    thread hops its code took."""
    executor = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    yield executor
    executor.shutdown()


def fill_disk(disk: Path) -> Path:
    """Fill the filesystem of ``disk`` (a small_disk) to its last byte with a file ``disk/filler``; returns it (remove
    it to give the room back)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def drop(inbox: Path, name: str, content: bytes | str, encoding: str = "utf-8") -> Path:
    """Drop a file the way a careful user does: write elsewhere, then rename into the inbox."""
    data = content.encode(encoding) if isinstance(content, str) else content
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.incoming"
    tmp.write_bytes(data)
    target = inbox / name
    tmp.rename(target)
    return target


def sitecustomize_env(folder: Path, code: str) -> dict[str, str]:
    """Environment for a child Python that runs ``code`` at start-up (a ``sitecustomize`` in ``folder``, put first on
    its PYTHONPATH): how a test puts an audit hook into a real daemon process without touching its code."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{folder}{os.pathsep}{path}" if path else str(folder)}


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Callable[[Path], DaemonProcess]]:
    """Makes daemon processes (real `retrain-uploader run`); at teardown every one still alive is killed and reaped."""
    from ._proc import DaemonProcess  # _proc imports this module: imported when used

    made: list[DaemonProcess] = []

    def make(config: Path) -> DaemonProcess:
        daemon = DaemonProcess(config, tmp_path, name=f"daemon{len(made) + 1}")
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        await daemon.close()


# -- the instant between a check and a rename ----------------------------------------------------------------------
# A user's rename over a source can land between the closer's look at it and its rename. Python's audit hooks run
# just before each os.rename / os.link syscall: there a test can drop a new file into exactly that instant, with real
# files and no change to the code under test. The hook is process-wide and cannot be removed: it does nothing unless
# a test has armed it.
armed: list[Callable[[str, str, str], None]] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if armed and event in {"os.rename", "os.link"}:
        armed[0](event, os.fsdecode(args[0]), os.fsdecode(args[1]))  # type: ignore[arg-type]


@pytest.fixture
def before_renames() -> Iterator[list[Callable[[str, str, str], None]]]:
    if not getattr(sys, "_retrain_closer_audit", False):
        sys.addaudithook(_audit)
        sys._retrain_closer_audit = True  # type: ignore[attr-defined]
    yield armed
    armed.clear()


def done_contents(inbox: Path) -> set[bytes]:
    done = inbox / "done"
    return {p.read_bytes() for p in done.iterdir() if p.is_file()} if done.is_dir() else set()
