"""Exactly once, in random interleavings: a hypothesis state machine drives the daemon as a real process.

Rules drop CSVs (contents from a small pool, so duplicates happen under other names), drop a file again under a name a
job still holds (renamed over it, as a copy tool does), drop train+eval pairs, kill -9 and restart the daemon, rename
the model in the config and send SIGHUP (the same inbox: the same remote model), and queue emulator faults (a PUT
whose answer is lost after or before the body, 5xx, 429 with ``Retry-After: 0``, an HTML 404 or a hang on the status
check, a slow answer, an expired upload URL).

After every step: no content reached a completed PUT twice (counted per dedup key: the sha256 of a CSV, the key of a
pair's two sources), every PUT the emulator completed is a package the ledger recorded, the ledger claims no upload
the emulator did not complete, and every file in ``done/`` is the file its job checked and its content was received.
At the end the faults are cleared and the daemon drains: every job closed, nothing left in the inbox or in
``failed/``, the last version dropped under each name is in ``done/``, each content received exactly once, and
neither the API key nor a presigned signature is in a log line or the ledger.

The emulator runs in this process on a background event loop (hypothesis' stateful tests are synchronous); the
daemon runs as ``retrain-uploader run``. The seed is printed; rerun one with ``--hypothesis-seed=N`` (or set
``RETRAIN_STATEFUL_SEED``); ``RETRAIN_STATEFUL_EXAMPLES`` runs more examples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import hypothesis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, get_state_machine_test, invariant, rule

from retrain_uploader.config import Settings
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import AFTER_UPLOAD
from retrain_uploader.packager import source_identity

from ._proc import DaemonProcess, LedgerView, write_config
from .conftest import KEYS, drop, wait_for

T = TypeVar("T")

SENT = frozenset(str(s) for s in AFTER_UPLOAD)
# The emulator never fails a retraining (a job whose retraining "failed" would also let the same content be sent
# again, by design), and all faults here are transient: no job may fail.
ALLOWED = (SENT - {"retrain_failed", "retrain_timeout"}) | {"queued", "packaging", "requesting", "uploading",
                                                          "duplicate"}
API_KEY = "key-alpha-0001"  # the model's key (tests/conftest.py KEYS), which must never be written anywhere
MODEL_NAMES = ("alpha", "alpha-renamed")
CSV_NAMES = ("a.csv", "b.csv", "c.csv")


def _table(seed: int) -> bytes:
    rnd = random.Random(seed)
    return ("id,x,y\n" + "".join(f"{seed}-{i},{rnd.random():.6f},{rnd.getrandbits(20)}\n" for i in range(3))).encode()


POOL = tuple(_table(i) for i in range(4))

FAULTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("upload_url", "http_status", {"status": 503}),
    ("upload_url", "http_status", {"status": 429, "retry_after": 0}),
    ("upload_url", "expire", {}),
    ("upload_url", "slow", {"delay_s": 0.3}),
    ("put", "drop", {"after_body": True}),  # arrived, answer lost
    ("put", "drop", {"after_body": False}),  # cut off before the body was read
    ("put", "http_status", {"status": 500}),
    ("put", "http_status", {"status": 429, "retry_after": 0}),
    ("put", "slow", {"delay_s": 0.3}),
    ("status", "http_status", {"status": 503, "retry_after": 0}),
    ("status", "http_status", {"status": 404, "body": "<html>Not Found</html>", "content_type": "text/html"}),
    ("status", "hang", {}),  # until the daemon's request timeout
    ("status", "malformed", {}),
    ("status", "drop", {}),
    ("status", "slow", {"delay_s": 0.3}),
)

SETTINGS = settings(
    max_examples=int(os.environ.get("RETRAIN_STATEFUL_EXAMPLES", "10")),
    stateful_step_count=15,
    deadline=None,
    database=None,  # a run is reproduced from its printed seed and steps, not from a local example database
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pair_key(train_sha: str, eval_sha: str) -> str:
    """A pair's dedup key as the packager derives it from its two sources (retrain_uploader.packager)."""
    return sha(b"pair\0" + train_sha.encode() + b"\0" + eval_sha.encode())


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``condition`` until it returns something truthy (the sync twin of conftest.wait_for)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return value


class LoopThread:
    """An event loop in a background thread, for the emulator and the asyncio child process of the daemon."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="stateful-loop", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the loop's thread: the emulator's lists and fault queue are only touched there."""

        async def call() -> T:
            return fn()

        return self.run(call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(20)


def guarded(method: Callable[..., None]) -> Callable[..., None]:
    """Marks the machine broken while a step runs, so teardown does not pile a second failure on the first."""

    @functools.wraps(method)
    def step(self: ExactlyOnce, *args: Any, **kwargs: Any) -> None:
        self.broken = True
        self.steps.append(f"{method.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
        method(self, *args, **kwargs)
        self.broken = False

    return step


class ExactlyOnce(RuleBasedStateMachine):
    def __init__(self, loop: LoopThread, root: Path, seed: object) -> None:
        super().__init__()
        self.loop, self.root, self.seed = loop, root, seed
        self.started = time.monotonic()
        self.steps: list[str] = []  # the rules run, printed on a failure (a replay may not fail the same way)
        self.broken = True
        self.emulator: Emulator | None = None
        self.daemon: DaemonProcess | None = None
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        self.broken = False

    def _start(self) -> None:
        self.emulator = self.loop.run(self._start_emulator())
        self.config = write_config(
            self.root,
            self.emulator.base_url,
            api={"connect_timeout_s": 1, "request_timeout_s": 1, "upload_read_timeout_s": 1},
            watch={"settle_s": 0.05, "rescan_s": 0.5},
            retry={"base_delay_s": 0.02, "max_delay_s": 0.2, "unknown_outcome_wait_s": 0.3},
            status={"poll_s": 0.1, "max_poll_delay_s": 0.3},
        )
        s = Settings.from_toml(self.config)
        self.model = "alpha"
        self.inbox = s.model(self.model).inbox
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.ledger = LedgerView(s.ledger.path)
        self.daemon = DaemonProcess(self.config, self.root)
        self.loop.run(self.daemon.start())
        self.versions: dict[str, list[str]] = {}  # name -> sha256 of each version dropped under it, in order
        self.key_of: dict[str, str] = {}  # package sha256 -> dedup key, as the ledger recorded them
        self.pairs = 0
        self.fresh = 0
        self.restarts = 0

    async def _start_emulator(self) -> Emulator:
        # A received upload still shows the old status for a moment (less than unknown_outcome_wait_s, as the
        # daemon assumes of the real service); every answer is a little late, so a kill finds requests in flight.
        emulator = Emulator(keys=KEYS, latency_s=0.02, status_lag_s=0.1)
        await emulator.start()
        return emulator

    def _stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.daemon is not None:
                self.loop.run(self.daemon.close())
        if self.emulator is not None:
            self.loop.run(self.emulator.stop())

    @property
    def why(self) -> str:
        assert self.daemon is not None
        return f"\n(seed {self.seed}, example folder {self.root})\n{self.daemon.tail(25)}"

    # -- the user ---------------------------------------------------------------------------------------------------
    def _drop(self, name: str, data: bytes) -> Path:
        path = drop(self.inbox, name, data)  # written under a hidden name, then renamed over whatever is there
        self.versions.setdefault(name, []).append(sha(data))
        return path

    @rule(name=st.sampled_from(CSV_NAMES), content=st.integers(0, len(POOL) - 1))
    @guarded
    def drop_csv(self, name: str, content: int) -> None:
        self._drop(name, POOL[content])

    @rule(name=st.sampled_from(CSV_NAMES), first=st.integers(0, len(POOL) - 1), second=st.integers(0, len(POOL) - 1))
    @guarded
    def drop_again_while_a_job_holds_the_name(self, name: str, first: int, second: int) -> None:
        """The second copy lands once a job has checked the first (new content, or the same bytes again)."""
        path = self._drop(name, POOL[first])
        dropped = source_identity(path)

        def taken() -> bool:
            checked = any(json.loads(j["source_ids"] or "{}").get(name) == dropped for j in self.ledger.jobs())
            # Or it left the inbox unchecked (the invariants then judge whether it was right to move it).
            return checked or source_identity(path) != dropped

        wait_until(taken, 20, f"a job to check {name}" + self.why)
        self._drop(name, POOL[second])

    @rule(train=st.integers(0, len(POOL) - 1), eval_=st.integers(0, len(POOL) - 1))
    @guarded
    def drop_pair(self, train: int, eval_: int) -> None:
        self.pairs += 1  # a fresh name: one half renamed over while its pair is zipped would wait for a partner
        self._drop(f"p{self.pairs}.train.csv", POOL[train])
        self._drop(f"p{self.pairs}.eval.csv", POOL[eval_])

    # -- the operator -----------------------------------------------------------------------------------------------
    @rule(while_down=st.none() | st.tuples(st.sampled_from(CSV_NAMES), st.integers(0, len(POOL) - 1)))
    @guarded
    def kill_9_and_restart(self, while_down: tuple[str, int] | None) -> None:
        assert self.daemon is not None
        self.loop.run(self.daemon.kill())
        if while_down is not None:
            self._drop(while_down[0], POOL[while_down[1]])
        self.loop.run(self.daemon.start())
        self.restarts += 1

    @rule(name=st.sampled_from(CSV_NAMES), hang_status=st.booleans())
    @guarded
    def kill_9_when_a_put_answer_is_lost(self, name: str, hang_status: bool) -> None:
        """The hardest window: a PUT arrived (or was cut off), its answer was lost, and the daemon dies before the
        status check has settled it. Fresh content, so that it is not a duplicate and is sure to be PUT."""
        emulator, daemon = self.emulator, self.daemon
        assert emulator is not None and daemon is not None

        def lost() -> int:
            # Dropped, not merely unanswered yet: a PUT in flight when `before` was taken (its status None too) and
            # answered meanwhile would cancel out the dropped one (seen once in the full suite).
            return self.loop.call(lambda: sum(r.endpoint == "put" and r.dropped for r in emulator.requests))

        before = lost()
        # Faults queued by earlier steps go first (a queue per endpoint): a `put slow` would take this PUT and leave
        # the drop waiting for a PUT that never comes. Cleared, so that this file's PUT is the one whose answer is lost.
        self.loop.call(emulator.clear_faults)
        self.loop.call(lambda: emulator.inject("put", "drop", after_body=True))
        if hang_status:
            self.loop.call(lambda: emulator.inject("status", "hang"))
        self.fresh += 1
        self._drop(name, _table(100 + self.fresh))
        wait_until(lambda: lost() > before, 20, "a PUT whose answer is lost" + self.why)
        self.loop.run(daemon.kill())
        self.loop.run(daemon.start())
        self.restarts += 1

    @rule()
    @guarded
    def rename_the_model_and_reload(self) -> None:
        """alpha -> alpha-renamed -> alpha ...: the same inbox and key, so the same remote model."""
        assert self.daemon is not None
        new = MODEL_NAMES[(MODEL_NAMES.index(self.model) + 1) % len(MODEL_NAMES)]
        text, count = re.subn(rf'(?m)^name = "{re.escape(self.model)}"$', f'name = "{new}"', self.config.read_text())
        assert count == 1, text
        tmp = self.config.with_name(".config.toml.new")
        tmp.write_text(text)
        tmp.chmod(0o600)
        tmp.replace(self.config)
        self.model = new
        reloads = len(self.daemon.logged("config.reloaded"))
        os.kill(self.daemon.pid, signal.SIGHUP)

        def answered() -> list[dict[str, Any]]:
            assert self.daemon is not None
            return [
                r for r in self.daemon.records()
                if r.get("event") in {"config.reload_refused", "config.reload_failed"}
            ] or self.daemon.logged("config.reloaded")[reloads:]

        [reloaded] = wait_until(answered, 15, "the reload" + self.why)
        assert reloaded["event"] == "config.reloaded" and reloaded["models"] == [new], reloaded

    # -- the network ------------------------------------------------------------------------------------------------
    @rule(fault=st.sampled_from(FAULTS), times=st.integers(1, 2))
    @guarded
    def inject_fault(self, fault: tuple[str, str, dict[str, Any]], times: int) -> None:
        endpoint, kind, params = fault
        emulator = self.emulator
        assert emulator is not None
        self.loop.call(lambda: emulator.inject(endpoint, kind, times=times, **params))

    @rule(seconds=st.sampled_from([0.05, 0.2, 0.6]))
    @guarded
    def let_it_run(self, seconds: float) -> None:
        time.sleep(seconds)  # the step itself: time passing while the daemon works (no outcome is assumed)

    # -- the invariants ---------------------------------------------------------------------------------------------
    def _uploads(self) -> list[str]:
        emulator = self.emulator
        assert emulator is not None
        return self.loop.call(lambda: [u.sha256 for u in emulator.uploads])

    def _placed(self, folder: str = "done") -> dict[str, str]:
        """``FOLDER/NAME`` -> sha256 for every dropped file there (not results or error files, not hidden files)."""
        where = self.inbox / folder
        if not where.is_dir():
            return {}
        return {
            f"{folder}/{p.name}": sha(p.read_bytes())
            for p in where.iterdir()
            if p.is_file() and p.name[0] != "." and p.name.endswith((".csv", ".zip")) and not p.name.endswith(
                ".result.zip"
            )
        }

    def _check(self) -> dict[str, Any]:
        # Read in this order: done/ -> uploads -> ledger -> uploads; each is at least as far along as the one before.
        in_done = self._placed("done")
        uploads = self._uploads()
        jobs = self.ledger.jobs()
        uploads_after = set(self._uploads())
        for job in jobs:
            if job["sha256"] and job["content_sha256"]:
                self.key_of[job["sha256"]] = job["content_sha256"]

        unknown = [s for s in uploads if s not in self.key_of]
        assert unknown == [], f"PUTs of packages the ledger never recorded: {unknown}" + self.why
        by_sha = collections.Counter(uploads)
        assert max(by_sha.values(), default=0) <= 1, f"the same bytes PUT twice: {by_sha}" + self.why
        by_key = collections.Counter(self.key_of[s] for s in uploads)
        twice = {k: n for k, n in by_key.items() if n > 1}
        assert twice == {}, f"the same content PUT twice (as different packages): {twice}" + self.why

        states = collections.Counter(job["state"] for job in jobs)
        failed = [
            (j["id"], j["sources"], j["state"], j["error"])
            for j in jobs
            if j["state"] not in ALLOWED
        ]
        assert failed == [], f"jobs failed, though the faults were transient: {failed}" + self.why
        claimed = [(j["id"], j["sha256"]) for j in jobs if j["state"] in SENT and j["sha256"] not in uploads_after]
        assert claimed == [], f"the ledger says uploaded, the emulator received nothing: {claimed}" + self.why

        received = set(by_key)
        where = {target: (job, i) for job in jobs for i, target in enumerate(job["moved_to"])}
        for target, digest in in_done.items():
            assert target in where, f"{target} is in done/ but no job moved it there" + self.why
            job, i = where[target]
            assert job["state"] in SENT | {"duplicate"}, f"{target}: job {job['id']} is {job['state']}" + self.why
            source = job["sources"][i]
            assert digest in self.versions.get(source, []), f"{target} is not a version of {source}" + self.why
            if job["kind"] == "csv":
                assert digest == job["sha256"], f"{target} is not the file job {job['id']} checked" + self.why
                key = digest
            else:
                halves = [in_done.get(t) for t in job["moved_to"][:2]]
                if None in halves:
                    continue  # the other half is being moved right now
                key = pair_key(*halves)  # type: ignore[arg-type]
                assert key == job["content_sha256"], f"{target}: the pair moved is not the pair checked" + self.why
            assert key in received, (
                f"{target} (job {job['id']}, {job['state']}) is in done/ but its content never arrived" + self.why
            )
        return {"jobs": jobs, "in_done": in_done, "where": where, "by_key": by_key, "states": states}

    @invariant()
    def nothing_twice_and_nothing_done_unsent(self) -> None:
        self.broken = True
        self._check()
        visible = [p for p in self.inbox.iterdir() if p.is_file() and p.name[0] != "."]
        for path in visible:  # the daemon never writes a source
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # taken (or archived) by the running daemon since the listing: not changed
                continue
            assert sha(data) in self.versions.get(path.name, []), f"{path.name} changed" + self.why
        self.broken = False

    # -- the end ----------------------------------------------------------------------------------------------------
    def teardown(self) -> None:
        try:
            if self.broken:
                self._print_steps()
            else:
                try:
                    self._drain_and_check()
                except BaseException:
                    self._print_steps()
                    raise
        finally:
            self._stop()

    def _print_steps(self) -> None:
        print(f"failing example (seed {self.seed}, folder {self.root}), its rules as they ran:")
        for step in self.steps:
            print(f"    {step}")

    def _drain_and_check(self) -> None:
        emulator, daemon = self.emulator, self.daemon
        assert emulator is not None and daemon is not None
        self.loop.call(emulator.clear_faults)
        assert daemon.running, "the daemon died" + self.why

        def drained() -> bool:
            left = [p for p in self.inbox.iterdir() if p.is_file() and p.name[0] != "."]
            return not left and all(job["closed"] for job in self.ledger.jobs())

        wait_until(drained, 40, "every job closed and the inbox empty" + self.why)
        seen = self._check()
        jobs, in_done, where, by_key = seen["jobs"], seen["in_done"], seen["where"], seen["by_key"]
        in_failed = self._placed("failed")
        for target in in_failed:  # only the jobs failed by design put a file there (the check above)
            assert target in where and where[target][0]["state"] == "failed", f"{target} in failed/" + self.why
        placed = {**in_done, **in_failed}
        for name, versions in self.versions.items():
            here = {digest for target, digest in placed.items() if _source(where[target]) == name}
            assert versions[-1] in here, f"the last {name} dropped is in neither done/ nor failed/" + self.why
            assert here <= set(versions), f"a {name} that was never dropped: {here - set(versions)}" + self.why
        for target, (job, _) in where.items():
            if target in in_done:
                key = job["content_sha256"]
                assert by_key[key] == 1, f"{target}: its content was received {by_key[key]} times" + self.why
        sent = {job["content_sha256"] for job in jobs if job["state"] in SENT}
        assert sent == set(by_key), "the uploaded jobs and the completed PUTs differ" + self.why
        self._check_no_secrets()
        # What the example reached, printed (pytest -s, or shown on a failure): the rules must reach the windows.
        logged = collections.Counter(r.get("event") for run in range(len(daemon.logs)) for r in daemon.records(run))
        print(
            f"example: {len(self.steps)} rules, {len(jobs)} jobs, {sum(by_key.values())} uploads, "
            f"{seen['states']['duplicate']} duplicates, {self.restarts} kill -9, {logged['config.reloaded']} reloads, "
            f"{logged['upload.outcome_unknown']} unknown outcomes, {logged['upload.not_arrived']} not arrived, "
            f"{logged['job.source_replaced']} replaced sources, {logged['job.waiting_for_same_content']} same-content "
            f"waits, {time.monotonic() - self.started:.1f} s"
        )

    def _check_no_secrets(self) -> None:
        assert self.daemon is not None
        signed = re.compile(r"X-Amz-Signature=[0-9a-f]{8}")
        for run, path in enumerate(self.daemon.logs):
            text = self.daemon.text(run)
            assert API_KEY not in text, f"the API key is in {path}"
            assert not signed.search(text), f"a presigned signature is in {path}"
        ledger = self.ledger.path
        for path in (ledger, ledger.with_name(ledger.name + "-wal")):
            if path.exists():
                data = path.read_bytes()
                assert API_KEY.encode() not in data and not signed.search(data.decode("latin-1")), path


def _source(placed: tuple[dict[str, Any], int]) -> str:
    job, i = placed
    name: str = job["sources"][i]
    return name


def _seed(config: pytest.Config) -> object:
    given = config.getoption("--hypothesis-seed", None) or os.environ.get("RETRAIN_STATEFUL_SEED")
    if given is None:
        return random.SystemRandom().getrandbits(32)
    with contextlib.suppress(ValueError):
        return int(given)
    return given


@pytest.mark.slow
@pytest.mark.timeout(600)  # passes in well under a minute; a failure shrinks for minutes
def test_drops_crashes_reloads_and_faults_in_any_order_send_nothing_twice_and_lose_nothing(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    seed = _seed(request.config)
    print(f"stateful seed: {seed}  (rerun: pytest {__file__} --hypothesis-seed={seed})")
    loop = LoopThread()
    try:
        # get_state_machine_test is run_state_machine_as_test without the call, so the seed can be set on it.
        test = get_state_machine_test(
            lambda: ExactlyOnce(loop, tmp_path_factory.mktemp("example"), seed), settings=SETTINGS
        )
        hypothesis.seed(seed)(test)()  # type: ignore[arg-type]
    finally:
        loop.close()



# -- found by the machine's rules, kept as a deterministic reproduction ----------------------------------------------


def _copy_keeping_mtime(inbox: Path, name: str, data: bytes, mtime_ns: int) -> Path:
    """What ``cp -p`` / ``rsync -a`` / an unzip does: a new file whose mtime is the original's, renamed into place."""
    tmp = inbox / f".{name}.incoming"
    tmp.write_bytes(data)
    os.utime(tmp, ns=(mtime_ns, mtime_ns))
    return tmp.rename(inbox / name)


def _same_file_to_stat(path: Path) -> tuple[int, ...]:
    """Everything ``stat`` tells apart that a user's copy can reproduce: device, inode (once freed), size, mtime."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@pytest.mark.slow
async def test_a_copy_with_the_checked_files_size_and_mtime_on_its_freed_inode_is_not_moved_as_that_file(
    tmp_path: Path, emulator: Emulator
) -> None:
    emulator.inject("put", "drop", after_body=True)  # A arrives, its answer is lost ...
    emulator.inject("status", "slow", delay_s=0)  # (the baseline before the PUT is answered)
    emulator.inject("status", "hang")  # ... and the check that settles it waits for the request timeout
    config = write_config(tmp_path, emulator.base_url, api={"request_timeout_s": 2}, watch={"settle_s": 0.05})
    inbox = Settings.from_toml(config).model("alpha").inbox
    inbox.mkdir(parents=True)
    ledger = LedgerView(Settings.from_toml(config).ledger.path)
    a, b, c = POOL[0], POOL[1], POOL[2]
    assert len(a) == len(b) == len(c) and len({a, b, c}) == 3
    mtime_ns = 1_700_000_000_000_000_000  # the exports' own timestamp, kept by the copy tool
    daemon = DaemonProcess(config, tmp_path)
    await daemon.start()
    try:
        checked = _same_file_to_stat(_copy_keeping_mtime(inbox, "a.csv", a, mtime_ns))
        await wait_for(lambda: emulator.uploads, 10, "A to arrive (its answer lost)")
        # Newer exports of the same size and timestamp are copied over it while the outcome is unknown: the first
        # frees A's inode, which the file system hands to the next one (or a later one: try a few).
        for attempt in range(40):
            path = _copy_keeping_mtime(inbox, "a.csv", c if attempt % 2 else b, mtime_ns)
            if _same_file_to_stat(path) == checked:
                break
        else:
            pytest.skip("this file system did not reuse the inode; the identity collision needs it")
        latest = path.read_bytes()
        [job] = await ledger.all_closed(1, 20)
        assert job["state"] in SENT
        assert [u.sha256 for u in emulator.uploads] == [sha(a)]
        # A's own file was overwritten by the user: nothing of job 1 is left to move. The newer export is another file
        # (whatever its stat says): it stays, and becomes a job of its own.
        in_done = {p.name: sha(p.read_bytes()) for p in (inbox / "done").glob("*.csv")}
        assert set(in_done.values()) <= {sha(a)}, f"moved to done/ as job 1's file, never uploaded: {in_done}"
        await ledger.all_closed(2, 20)
        assert sorted(u.sha256 for u in emulator.uploads) == sorted([sha(a), sha(latest)])
    finally:
        await daemon.close()
