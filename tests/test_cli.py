"""The ``retrain-uploader`` command as users script it: a real subprocess, against a config file, a ledger filled
by really running the daemon, and a real emulator on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from retrain_uploader.admin import PROBE_JOB_ID
from retrain_uploader.config import DEFAULT_CONFIG_PATH, Settings
from retrain_uploader.emulator import Emulator
from retrain_uploader.history import display_width
from retrain_uploader.ledger import AFTER_UPLOAD, Ledger, State

from .conftest import KEYS, Daemon, drop, wait_for

CSV = 'id,age,plan\n1,34,basic\n2,51,"premium, annual"\n'
CSV2 = "id,age,plan\n3,22,basic\n"
RAGGED = "a,b,c\n1,2,3\n4,5\n"
JOB_KEYS = {
    "id",
    "model",
    "state",
    "upload_filename",
    "retrain_job_id",
    "sha256",
    "size_bytes",
    "attempts",
    "error",
    "sources",
    "created_at",
    "updated_at",
}
_SCRIPT = Path(sys.executable).with_name("retrain-uploader")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "retrain_uploader.cli"]

SENT = {str(s) for s in AFTER_UPLOAD}  # uploaded; the retraining that follows may have moved it on already
StartDaemon = Callable[..., Awaitable[Daemon]]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RETRAIN_UPLOADER_CONFIG", "CREDENTIALS_DIRECTORY")}
    env.update(extra)
    return env


async def cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 30) -> Result:
    """Run the command without blocking the event loop (the daemon and the emulator under test share it)."""
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else _env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    result = Result(proc.returncode, out.decode(), err.decode())
    for secret in KEYS:  # no command ever prints a key, whatever it is asked
        assert secret not in result.out + result.err, (args, result)
    return result


TOML = """\
[api]
base_url = "{base_url}"
request_timeout_s = 5
upload_read_timeout_s = 5

[ledger]
path = "state/ledger.sqlite3"  # relative: taken relative to this file's folder

[watch]
settle_s = 0.05
rescan_s = 0.5

[retry]
base_delay_s = 0.01
max_delay_s = 0.05
max_attempts = 6
paused_retry_s = 0.2

[pool]
workers = 2
shutdown_grace_s = 5

[[models]]
name = "alpha"
inbox = "inbox/alpha"
api_key_file = "keys/alpha"

[[models]]
name = "beta"
inbox = "inbox/beta"
api_key_file = "keys/beta"
"""


@pytest.fixture
def config(tmp_path: Path, emulator: Emulator) -> Path:
    """The config file the CLI reads; the daemon is built from the same file with ``Settings.from_toml``."""
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "alpha").write_text("key-alpha-0001\n")
    (keys / "beta").write_text("key-beta-0002\n")
    for key in keys.iterdir():
        key.chmod(0o600)
    (tmp_path / "inbox").mkdir(exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text(TOML.format(base_url=emulator.base_url))
    path.chmod(0o600)
    return path


def ledger_jobs(config: Path) -> list[dict[str, Any]]:
    with Ledger(Settings.from_toml(config).ledger.path) as ledger:
        return [job.as_dict() for job in ledger.jobs()]


def rewrite(path: Path, edit: Callable[[str], str]) -> None:
    path.write_text(edit(path.read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- jobs ---------------------------------------------------------------------------------------------------------


async def test_jobs_lists_the_ledger_as_text_and_as_json_lines(
    start_daemon: StartDaemon, emulator: Emulator, config: Path
) -> None:
    d = await start_daemon(Settings.from_toml(config))
    drop(d.inbox("alpha"), "good.csv", CSV)
    drop(d.inbox("alpha"), "ragged.csv", RAGGED)
    drop(d.inbox("beta"), "b.csv", CSV2)
    jobs = await d.closed_jobs(3)
    assert await d.stop() == 0  # a still ledger: the retrain tracker would move states on between two reads
    by_name = {j.upload_filename: j for j in jobs}
    assert by_name["ragged.csv"].state is State.FAILED
    assert by_name["good.csv"].state in AFTER_UPLOAD and by_name["b.csv"].state in AFTER_UPLOAD

    listed = await cli("jobs", "--json", "--config", config)
    assert listed.code == 0, listed
    rows = [json.loads(line) for line in listed.out.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row.keys() >= JOB_KEYS, row
    assert rows == ledger_jobs(config)  # exactly the ledger, in id order
    good = next(r for r in rows if r["upload_filename"] == "good.csv")
    assert good["retrain_job_id"] in emulator.jobs
    assert (good["size_bytes"], good["sources"]) == (len(CSV), ["good.csv"])
    assert good["sha256"] == next(u.sha256 for u in emulator.uploads if u.filename == "good.csv")
    ragged = next(r for r in rows if r["upload_filename"] == "ragged.csv")
    assert ragged["state"] == "failed" and "row" in ragged["error"] and ragged["retrain_job_id"] is None
    assert {r["state"] for r in rows} - {"failed"} <= SENT

    failed = await cli("jobs", "--json", "--state", "failed", "--config", config)
    assert [json.loads(line)["id"] for line in failed.out.splitlines()] == [ragged["id"]]
    same = await cli("jobs", "--json", "--state", good["state"], "--config", config)
    assert [json.loads(line) for line in same.out.splitlines()] == [r for r in rows if r["state"] == good["state"]]
    beta = await cli("jobs", "--json", "--model", "beta", "--config", config)
    assert [json.loads(line)["upload_filename"] for line in beta.out.splitlines()] == ["b.csv"]
    nothing = await cli("jobs", "--json", "--state", "duplicate", "--config", config)
    assert (nothing.code, nothing.out) == (0, "")
    bogus = await cli("jobs", "--state", "done", "--config", config)
    assert bogus.code == 2 and "invalid choice" in bogus.err

    text = await cli("jobs", "--config", config)
    assert text.code == 0, text
    header, *lines = text.out.splitlines()
    assert header.split() == ["id", "model", "state", "upload_filename", "retrain_job_id", "updated_at"]
    assert len(lines) == 3
    for row, line in zip(rows, lines, strict=True):
        fields = line.split()
        assert fields[:4] == [str(row["id"]), row["model"], row["state"], row["upload_filename"]], line
        assert (row["retrain_job_id"] or "-") in fields
    assert ragged["error"] in lines[[r["id"] for r in rows].index(ragged["id"])]


async def test_jobs_and_status_before_any_ledger_exists(config: Path) -> None:
    jobs = await cli("jobs", "--config", config)
    assert (jobs.code, jobs.out) == (0, "")
    status = await cli("status", "--json", "--config", config)
    assert status.code == 0, status
    report = json.loads(status.out)
    assert [m["model"] for m in report["models"]] == ["alpha", "beta"]
    assert all(m["jobs"] == {} and not m["paused"] for m in report["models"])
    assert not Settings.from_toml(config).ledger.path.exists()  # a read-only command creates no ledger


# -- status -------------------------------------------------------------------------------------------------------


async def test_status_names_a_file_that_is_not_utf8_on_a_strict_utf8_stdout(config: Path) -> None:
    # A name of raw bytes reaches Python with a lone surrogate (b"\xff" -> "\udcff"); a strict UTF-8 stdout
    # (PYTHONIOENCODING=utf-8) cannot encode it. status shows it as the ledger and failed/ do: a \xff escape.
    inbox = config.parent / "inbox" / "alpha"
    drop(inbox, os.fsdecode(b"sales-\xff.csv"), CSV)
    env = _env(PYTHONIOENCODING="utf-8")
    result = await cli("status", "--json", "--config", config, env=env)
    assert result.code == 0, result
    [alpha] = [m for m in json.loads(result.out)["models"] if m["model"] == "alpha"]
    assert alpha["oldest_waiting_file"]["file"] == "sales-\\xff.csv"
    text = await cli("status", "--config", config, env=env)
    assert text.code == 0, text
    assert "sales-" in text.out and "xff.csv" in text.out


async def test_status_shows_counts_the_oldest_waiting_file_and_a_paused_model_with_its_reason(
    start_daemon: StartDaemon, emulator: Emulator, config: Path
) -> None:
    emulator.set_key_state("key-beta-0002", "inactive")
    d = await start_daemon(Settings.from_toml(config))
    drop(d.inbox("alpha"), "good.csv", CSV)
    drop(d.inbox("alpha"), "ragged.csv", RAGGED)
    old = drop(d.inbox("beta"), "b-old.csv", CSV)
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    drop(d.inbox("beta"), "b-new.csv", CSV2)
    await wait_for(lambda: len([j for j in d.jobs() if j.model == "alpha" and j.closed]) == 2, what="alpha done")

    def beta_paused() -> Any:
        with Ledger(d.settings.ledger.path) as ledger:
            return ledger.models().get("beta", {}).get("paused_reason")

    await wait_for(beta_paused, what="beta paused in the ledger")

    result = await cli("status", "--json", "--config", config)
    assert result.code == 0, result
    report = json.loads(result.out)
    assert report["ledger"] == str(d.settings.ledger.path)
    models = {m["model"]: m for m in report["models"]}
    alpha, beta = models["alpha"], models["beta"]
    assert alpha["jobs"].pop("failed") == 1 and list(alpha["jobs"].values()) == [1] and set(alpha["jobs"]) <= SENT
    assert (alpha["paused"], alpha["files_waiting"], alpha["oldest_waiting_file"]) == (False, 0, None)
    assert alpha["last_success_at"] is not None
    failed_job = next(j for j in d.jobs() if j.state is State.FAILED)
    assert alpha["last_failed_job"]["id"] == failed_job.id and alpha["last_failed_job"]["error"] == failed_job.error
    assert beta["paused"] is True and "Inactive_credential." in beta["paused_reason"] and beta["paused_at"]
    assert beta["files_waiting"] == 2
    assert beta["oldest_waiting_file"]["file"] == "b-old.csv" and beta["oldest_waiting_file"]["age_s"] >= 3600
    assert beta["inbox"] == str(d.inbox("beta"))
    assert uploads_of(emulator) == ["good.csv"]

    text = await cli("status", "--config", config)
    assert text.code == 0, text
    sections = {s.split()[0]: s for s in text.out.split("\n\n")[1:]}
    assert "PAUSED since" in sections["beta"] and "Inactive_credential." in sections["beta"]
    assert "2 file(s) in the inbox, oldest 'b-old.csv'" in sections["beta"]
    assert "PAUSED" not in sections["alpha"]
    assert "failed 1" in sections["alpha"]


def uploads_of(emulator: Emulator) -> list[str]:
    return sorted(u.filename for u in emulator.uploads)


# -- retry --------------------------------------------------------------------------------------------------------


async def test_retry_puts_a_failed_jobs_file_back_once(
    start_daemon: StartDaemon, emulator: Emulator, config: Path
) -> None:
    settings = Settings.from_toml(config)
    d = await start_daemon(settings)
    inbox = d.inbox("alpha")
    drop(inbox, "good.csv", CSV)
    drop(inbox, "ragged.csv", RAGGED)
    jobs = await d.closed_jobs(2)
    [failed] = [j for j in jobs if j.state is State.FAILED]
    [uploaded] = [j for j in jobs if j.state is not State.FAILED]
    assert failed.moved_to == ("failed/ragged.csv", "failed/ragged.error.json")
    assert await d.stop() == 0  # so that the file is seen back in the inbox before a daemon takes it
    uploaded = next(j for j in d.jobs() if j.id == uploaded.id)

    not_failed = await cli("retry", str(uploaded.id), "--config", config)
    assert not_failed.code == 1 and f"cannot retry job {uploaded.id}" in not_failed.err
    assert f"it is {uploaded.state}, only failed (or retrain_timeout) jobs can be retried" in not_failed.err
    missing = await cli("retry", "999", "--config", config)
    assert missing.code == 1 and "no job 999" in missing.err, missing

    first = await cli("retry", str(failed.id), "--config", config)
    assert first.code == 0, first
    assert first.out.splitlines() == ["restored ragged.csv"]
    assert (inbox / "ragged.csv").read_text() == RAGGED
    assert not (inbox / "failed" / "ragged.csv").exists()
    assert not (inbox / "failed" / "ragged.error.json").exists()
    assert json.loads((inbox / "failed" / "ragged.error.json.retried").read_text())["job_id"] == failed.id
    with Ledger(settings.ledger.path) as ledger:
        assert [e["detail"] for e in ledger.events(failed.id) if e["event"] == "retried"] == [
            {"restored": ["ragged.csv"]}
        ]

    again = await cli("retry", str(failed.id), "--config", config)
    assert again.code == 1 and f"cannot retry job {failed.id}" in again.err and "retried already" in again.err
    assert (inbox / "ragged.csv").read_text() == RAGGED  # untouched

    # A daemon takes the file again, as a new job; it fails again and its files take the same names in failed/.
    d2 = await start_daemon(settings)
    second = next(j for j in await d2.closed_jobs(3) if j.id not in (failed.id, uploaded.id))
    assert second.sources == ("ragged.csv",) and second.state is State.FAILED
    assert second.moved_to == ("failed/ragged.csv", "failed/ragged.error.json")

    # Those files are the new job's: retrying the old job again must not take them.
    third = await cli("retry", str(failed.id), "--config", config)
    assert third.code == 1 and "retried already" in third.err
    assert (inbox / "failed" / "ragged.csv").exists() and (inbox / "failed" / "ragged.error.json").exists()
    assert uploads_of(emulator) == ["good.csv"]


# -- check-config -------------------------------------------------------------------------------------------------


async def test_check_config_accepts_a_good_config_without_touching_the_api(emulator: Emulator, config: Path) -> None:
    result = await cli("check-config", "--config", config)
    assert result.code == 0, result
    assert result.out.strip() == f"{config}: OK, 2 model(s)"
    assert emulator.requests == []


async def test_check_config_names_a_missing_key_file(tmp_path: Path, config: Path) -> None:
    (tmp_path / "keys" / "beta").unlink()
    result = await cli("check-config", "--config", config)
    assert result.code == 2, result
    assert f"models.beta.api_key_file: cannot read key file {tmp_path / 'keys' / 'beta'}" in result.err
    assert "models.alpha" not in result.err and result.out == ""


async def test_check_config_names_a_key_file_with_more_than_one_token(tmp_path: Path, config: Path) -> None:
    (tmp_path / "keys" / "alpha").write_text("key-alpha-0001 key-beta-0002\n")
    result = await cli("check-config", "--config", config)  # cli() asserts neither key is echoed
    assert result.code == 2 and "models.alpha" in result.err and "more than one token" in result.err


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("settle_s", "settel_s"), "watch.settel_s: unknown key (misspelt?)"),
        (lambda t: t + "\n[apii]\nbase_url = 'x'\n", "apii: unknown key (misspelt?)"),
        (
            lambda t: t.replace('api_key_file = "keys/alpha"', 'api_key = "key-alpha-0001"'),
            "models[0] (alpha).api_key: unknown key (misspelt?)",
        ),
        (lambda t: t.replace("workers = 2", "workers = 0"), "pool.workers: Input should be greater than or equal to 1"),
        (
            lambda t: t.replace('api_key_file = "keys/beta"', ""),
            "models[1] (beta): set exactly one of api_key_file, api_key_env, api_key_credential",
        ),
        (lambda t: t.replace("[api]", "[api\n"), "not valid TOML"),
    ],
    ids=["unknown-key", "unknown-section", "key-in-the-config", "out-of-range", "no-key-source", "bad-toml"],
)
async def test_a_config_error_names_the_file_and_the_key_and_exits_2(
    config: Path, edit: Callable[[str], str], expected: str
) -> None:
    rewrite(config, edit)
    result = await cli("check-config", "--config", config)  # cli() asserts a key in the file is not echoed
    assert result.code == 2, result
    assert f"{config}: {expected}" in result.err, result.err
    assert result.out == ""


@pytest.mark.parametrize("command", [["jobs"], ["jobs", "--json"], ["status"], ["retry", "1"], ["run"]])
async def test_every_command_refuses_a_bad_config_with_exit_2(config: Path, command: list[str]) -> None:
    rewrite(config, lambda t: t.replace("rescan_s", "rescan_secs"))
    result = await cli(*command, "--config", config)
    assert result.code == 2, result
    assert f"{config}: watch.rescan_secs: unknown key" in result.err and result.out == ""


async def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    result = await cli("check-config", "--config", tmp_path / "nope.toml")
    assert result.code == 2 and f"{tmp_path / 'nope.toml'}: cannot read the config file" in result.err


# -- check-config --online ----------------------------------------------------------------------------------------


async def test_check_config_online_proves_each_key_without_creating_a_retrain_job(
    emulator: Emulator, config: Path
) -> None:
    result = await cli("check-config", "--online", "--config", config)
    assert result.code == 0, result
    assert "keys accepted by the API" in result.out
    assert [(r.method, r.endpoint, r.job_id) for r in emulator.requests] == [("GET", "status", PROBE_JOB_ID)] * 2
    assert emulator.jobs == {} and emulator.uploads == []


@pytest.mark.parametrize("bad", [["alpha"], ["alpha", "beta"]])
async def test_check_config_online_names_each_rejected_key(
    emulator: Emulator, config: Path, tmp_path: Path, bad: list[str]
) -> None:
    emulator.set_key_state("key-alpha-0001", "inactive")
    if "beta" in bad:
        (tmp_path / "keys" / "beta").write_text("not-a-key-the-api-knows\n")
    result = await cli("check-config", "--online", "--config", config)
    assert result.code == 2, result
    assert "models.alpha: the API rejected the key: Inactive_credential." in result.err
    assert ("models.beta: the API rejected the key: invalid_api_key." in result.err) == ("beta" in bad)
    assert "not-a-key-the-api-knows" not in result.err + result.out
    assert result.out == ""
    assert {r.endpoint for r in emulator.requests} == {"status"}  # never upload_url: no retrain job is created
    assert emulator.jobs == {}


async def test_check_config_online_says_when_the_api_cannot_be_reached(config: Path) -> None:
    port = free_port()  # nothing listens there
    rewrite(config, lambda t: re.sub(r'base_url = ".*"', f'base_url = "http://127.0.0.1:{port}"', t))
    result = await cli("check-config", "--online", "--config", config)
    assert result.code == 2, result
    assert "models.alpha: cannot reach the API" in result.err and "models.beta: cannot reach the API" in result.err


# -- where the config comes from ----------------------------------------------------------------------------------


async def test_the_config_comes_from_the_environment_when_config_is_absent(
    start_daemon: StartDaemon, config: Path, tmp_path: Path
) -> None:
    d = await start_daemon(Settings.from_toml(config))
    drop(d.inbox("alpha"), "good.csv", CSV)
    await d.closed_jobs(1)
    env = _env(RETRAIN_UPLOADER_CONFIG=str(config))

    checked = await cli("check-config", env=env)
    assert checked.code == 0 and checked.out.startswith(f"{config}: OK"), checked
    jobs = await cli("jobs", "--json", env=env)
    assert jobs.code == 0 and [json.loads(line)["upload_filename"] for line in jobs.out.splitlines()] == ["good.csv"]
    status = await cli("status", "--json", env=env)
    assert json.loads(status.out)["ledger"] == str(d.settings.ledger.path)

    # --config wins over the environment.
    elsewhere = _env(RETRAIN_UPLOADER_CONFIG=str(tmp_path / "elsewhere.toml"))
    assert (await cli("check-config", "--config", config, env=elsewhere)).code == 0
    named = await cli("check-config", env=elsewhere)
    assert named.code == 2 and f"{tmp_path / 'elsewhere.toml'}: cannot read the config file" in named.err


@pytest.mark.skipif(DEFAULT_CONFIG_PATH.exists(), reason="this machine has a real config at the default path")
async def test_without_config_or_environment_the_default_path_is_used() -> None:
    result = await cli("check-config")
    assert result.code == 2 and f"{DEFAULT_CONFIG_PATH}: cannot read the config file" in result.err


# -- emulator and demo --------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_emulator_command_serves_on_its_port_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "emulator.log", "wb") as log:  # stderr to a file: a full pipe must not stall the server
        proc = await asyncio.create_subprocess_exec(
            *COMMAND, "emulator", "--port", str(port), stdout=asyncio.subprocess.PIPE, stderr=log, env=_env()
        )
    assert proc.stdout is not None
    try:
        banner: list[str] = []
        while not banner or "Stop with" not in banner[-1]:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, f"the emulator exited: {banner} {(tmp_path / 'emulator.log').read_text()}"
            banner.append(line)
        base = f"http://127.0.0.1:{port}"
        assert f"listening on {base}" in banner[0]
        assert any("x-api-key: demo-key" in line for line in banner)

        async with aiohttp.ClientSession() as session:
            url = f"{base}/v1/external/retrain_jobs/upload_url?filename=a.csv"
            async with session.get(url, headers={"x-api-key": "demo-key"}) as response:
                assert response.status == 200
                body = await response.json()
            assert body["upload_url"].startswith(f"{base}/") and body["retrain_job_id"]
            async with session.get(url, headers={"x-api-key": "wrong"}) as response:
                assert "invalid_api_key." in await response.text()
            async with session.get(f"{base}/_emulator/requests") as response:
                seen = await response.json()
            assert [(r["endpoint"], r["status"]) for r in seen[:2]] == [("upload_url", 200), ("upload_url", 400)]

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
async def test_demo_once_uploads_the_samples_and_prints_the_ledger(tmp_path: Path) -> None:
    result = await cli("demo", "--once", "--dir", tmp_path / "demo", timeout=50)
    assert result.code == 0, result
    rows = result.out.split("\nledger:\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]  # after the header line
    ledger = [line for line in rows if not line.startswith("       ")]  # job rows; indented lines are results
    assert len(ledger) == 3 and all(line.split()[1] in SENT for line in ledger), result.out
    results = [line for line in rows if line.startswith("       retraining job_finished")]
    assert len(results) == 3 and all("result in done/" in line for line in results), result.out
    assert {line.split()[2] for line in ledger} == {"churn.csv", "sales-2026-11.zip", "来店予測.csv"}
    assert "the emulator received 3 upload(s)" in result.out
    # columns line up in a terminal: the retrain_job_id column starts at the same cell on every row (来店予測 is
    # eight cells wide, not four)
    starts = {display_width(line[: line.index(line.split()[3])]) for line in ledger}
    assert len(starts) == 1, result.out


@pytest.mark.slow
async def test_demo_once_in_a_folder_used_before_uploads_its_own_samples(tmp_path: Path) -> None:
    first = await cli("demo", "--once", "--dir", tmp_path / "demo", timeout=50)
    assert first.code == 0, first
    second = await cli("demo", "--once", "--dir", tmp_path / "demo", timeout=50)
    assert second.code == 0, second
    assert "the emulator received 3 upload(s)" in second.out  # not the first run's ledger, reported again
    runs = sorted((tmp_path / "demo").iterdir())
    assert len(runs) == 2 and all(run.name.startswith("run-") for run in runs)
    untaken = [p.name for run in runs for p in (run / "inbox" / "demo").iterdir() if p.is_file()]
    assert untaken == []



def test_switch_of_a_job_whose_model_left_the_config_says_so(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Ledger(state / "ledger.sqlite3") as ledger:
        job = ledger.create_job(model="gone", kind="csv", name="a", sources=["a.csv"], upload_filename="a.csv",
                                inbox=str(tmp_path / "in" / "gone"))
        ledger.update(job.id, state=State.FINISHED, retrain_job_id="rj-1", closed=1)
    key = tmp_path / "alpha.key"
    key.write_text("key-alpha-0001\n")
    key.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(
        f"[api]\nbase_url = \"http://127.0.0.1:9\"\n[ledger]\npath = {json.dumps(str(state / 'ledger.sqlite3'))}\n"
        f"[[models]]\nname = \"alpha\"\ninbox = {json.dumps(str(tmp_path / 'in' / 'alpha'))}\n"
        f"api_key_file = {json.dumps(str(key))}\n"
    )
    config.chmod(0o600)
    done = subprocess.run([*COMMAND, "switch", str(job.id), "--config", str(config)], capture_output=True, text=True,
                          timeout=30, env=_env(), check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"retrain-uploader: cannot switch job {job.id}: model 'gone' is no longer in the config"
    )
