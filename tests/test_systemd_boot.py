"""The installed unit under a real systemd 252, as a user's host runs it: a container booted with systemd-nspawn
(tests/_nspawn.py), the project installed by deploy/install.sh from a wheelhouse, the emulator as the API (a second
unit in the container: --private-network), and every check made with systemctl and journalctl.

The tests share one container and run in file order, as an operator would: install, enable, upload, reload, stop,
crash, hang, bad config. Each one first brings the service back to the state it needs, so one failure does not hide
the next. Skipped, with the reason, where a container cannot be booted (not root, no systemd-nspawn, no registry
for the wheelhouse, a boot that fails); .ci/run installs systemd-nspawn when it can and says when it was skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import _nspawn
from .conftest import drop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

PROJECT = Path(__file__).resolve().parent.parent
UNIT = "retrain-uploader"
EMULATOR_UNIT = "p1-emulator"
VENV_BIN = "/opt/retrain-uploader/venv/bin/retrain-uploader"
CONFIG = "/etc/retrain-uploader/config.toml"
INBOX = "/srv/retrain/churn"
KEY = "churn-key-0001"
PORT = 8787
DROPIN = f"/etc/systemd/system/{UNIT}.service.d/zz-test.conf"

# What an operator would write after install.sh: the emulator as the API, one model, quick settle and polling.
GOOD_CONFIG = f"""\
[api]
base_url = "http://127.0.0.1:{PORT}"
connect_timeout_s = 2
request_timeout_s = 5

[ledger]
path = "/var/lib/retrain-uploader/ledger.sqlite3"

[watch]
settle_s = 0.2
rescan_s = 1

[retry]
base_delay_s = 0.1
max_delay_s = 1

[status]
poll_s = 0.3
max_poll_delay_s = 1

[pool]
shutdown_grace_s = 5

[[models]]
name = "churn"
inbox = "{INBOX}"
api_key_file = "/etc/retrain-uploader/keys/churn"
"""
# Valid TOML, invalid config: check-config and `run` both name the key.
BAD_CONFIG = GOOD_CONFIG.replace('base_url = "http://', 'base_url = "ftp://')


@dataclass
class Host:
    """The booted container with the project installed, and what install.sh printed."""

    box: _nspawn.Container
    install: subprocess.CompletedProcess[str]
    timings: dict[str, float] = field(default_factory=dict)

    def sh(self, *cmd: str, input: str | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.box.run(*cmd, input=input, timeout=timeout)

    def ok(self, *cmd: str, input: str | None = None, timeout: float = 30.0) -> str:
        return self.box.run(*cmd, input=input, timeout=timeout, check=True).stdout

    def unit(self, *props: str) -> dict[str, str]:
        return self.box.show(UNIT, *props)

    def write_config(self, text: str) -> None:
        self.ok("install", "-m", "0640", "-o", "root", "-g", "retrain-uploader", "/dev/stdin", CONFIG, input=text)

    def cursor(self) -> int:
        """Where the journal ends now, as its sequence number: ``journal(after=...)`` keeps only later records.

        Not ``--after-cursor``: journalctl 252 combined with a field match (``EVENT=x --after-cursor=C``) returns
        nothing at all here, though either alone works."""
        out = self.ok("journalctl", "--no-pager", "-n", "0", "--show-cursor", "-q")
        return _seqnum(out.strip().removeprefix("-- cursor: "))

    def journal(self, *args: str, after: int | None = None) -> list[dict[str, Any]]:
        """``journalctl -u retrain-uploader ARGS -o json``, one dict per record."""
        out = self.ok("journalctl", "--no-pager", "-u", UNIT, "-o", "json", *args)
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [r for r in records if after is None or _seqnum(r["__CURSOR"]) > after]

    def daemon_events(self, *args: str, after: int | None = None) -> list[dict[str, Any]]:
        """The daemon's own records (not systemd's lines about the unit)."""
        return [r for r in self.journal(*args, after=after) if "EVENT" in r]

    def ensure_active(self, config: str = GOOD_CONFIG) -> int:
        """The service running the given config, whatever a previous test left; returns its main PID."""
        self.write_config(config)
        self.sh("systemctl", "reset-failed", UNIT)
        if self.unit("ActiveState")["ActiveState"] != "active":
            self.ok("systemctl", "start", UNIT)
        return int(self.unit("MainPID")["MainPID"])


def _seqnum(cursor: str) -> int:
    """The sequence number in a journal cursor (``s=...;i=9c;b=...``): it grows with every record of this boot."""
    fields = dict(part.split("=", 1) for part in cursor.split(";"))
    return int(fields["i"], 16)


def _skip_unless_possible() -> None:
    reason = _nspawn.unavailable()
    if reason:
        pytest.skip(f"systemd boot test skipped: {reason}")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    _skip_unless_possible()
    work = tmp_path_factory.mktemp("nspawn")
    timings: dict[str, float] = {}
    started = time.monotonic()
    source, wheels = work / "src", work / "wheels"
    _nspawn.copy_source(PROJECT, source)
    try:
        _nspawn.build_wheelhouse(source, wheels, work)
    except subprocess.CalledProcessError as e:  # no registry: nothing to install from
        last = (e.stderr or "").strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"systemd boot test skipped: cannot build the wheelhouse (pip wheel: {last[0]})")
    timings["wheelhouse"] = time.monotonic() - started
    root = work / "root"
    _nspawn.make_root(root)
    box = _nspawn.Container(root, work / "console.log", binds_ro={source: "/src", wheels: "/wheels"})
    try:
        started = time.monotonic()
        try:
            box.boot()
        except _nspawn.BootError as e:
            pytest.skip(f"systemd boot test skipped: the container did not boot: {e}")
        timings["boot"] = time.monotonic() - started
        started = time.monotonic()
        install = box.run("/src/deploy/install.sh", "--wheelhouse", "/wheels", "/src", timeout=300)
        timings["install.sh"] = time.monotonic() - started
        h = Host(box, install, timings)
        if install.returncode == 0:
            # The operator's part: a key readable by the service group, the API (here the emulator) listening.
            h.ok("install", "-m", "0640", "-o", "root", "-g", "retrain-uploader", "/dev/stdin",
                 "/etc/retrain-uploader/keys/churn", input=KEY + "\n")
            h.write_config(GOOD_CONFIG)
            h.ok("systemd-run", f"--unit={EMULATOR_UNIT}", "--property=DynamicUser=yes", VENV_BIN, "emulator",
                 "--port", str(PORT), "--key", f"{KEY}=1", "--retrain-s", "0.5")
        yield h
        print(f"\nsystemd boot test timings: {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}")
    finally:
        problems = box.close()
        assert problems == [], f"teardown left something behind: {problems}"


async def _until(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    return await wait_for(condition, timeout, what)


# -- install and start ----------------------------------------------------------------------------------------------


def test_install_sh_installs_the_unit_offline_from_a_wheelhouse(host: Host) -> None:
    assert host.install.returncode == 0, host.install.stdout[-3000:] + host.install.stderr[-3000:]
    assert "Installed retrain-uploader." in host.install.stdout
    assert host.ok(VENV_BIN, "--help").startswith("usage: retrain-uploader")
    assert host.ok("id", "-un", "retrain-uploader").strip() == "retrain-uploader"
    # install.sh ran daemon-reload: systemd knows the unit as installed, not enabled yet.
    unit = host.unit("LoadState", "FragmentPath", "UnitFileState", "Type")
    assert unit == {"LoadState": "loaded", "FragmentPath": f"/etc/systemd/system/{UNIT}.service",
                    "UnitFileState": "disabled", "Type": "notify"}
    # The operator's first check, as install.sh tells them, passes on the config written for this test.
    check = host.sh("runuser", "-u", "retrain-uploader", "--", VENV_BIN, "check-config", "--config", CONFIG)
    assert check.returncode == 0, check.stderr


async def test_enable_now_returns_once_the_daemon_is_ready(host: Host) -> None:
    await _until(lambda: "listening on" in host.ok("journalctl", "-u", EMULATOR_UNIT, "-o", "cat"), "the emulator")
    started = time.monotonic()
    enable = host.sh("systemctl", "enable", "--now", UNIT)
    host.timings["enable --now"] = time.monotonic() - started
    assert enable.returncode == 0, enable.stderr
    # Type=notify: `enable --now` returned only after READY=1, so the unit is already active, with a STATUS= line.
    unit = host.unit("ActiveState", "SubState", "UnitFileState", "StatusText", "NRestarts", "WatchdogUSec")
    assert unit["ActiveState"] == "active" and unit["SubState"] == "running", unit
    assert unit["WatchdogUSec"] == "1min"
    assert unit["UnitFileState"] == "enabled" and unit["NRestarts"] == "0"
    assert unit["StatusText"], unit
    events = [r["EVENT"] for r in host.daemon_events()]
    assert "service.started" in events


# -- an upload, and the journal of it ----------------------------------------------------------------------------------


async def test_a_csv_dropped_in_the_inbox_is_uploaded_and_its_story_is_one_journal_query(host: Host) -> None:
    host.ensure_active()
    inbox = host.box.path(INBOX)
    await _until(inbox.is_dir, "the daemon to create its inbox")
    started = time.monotonic()
    drop(inbox, "week1.csv", "id,x\n1,2\n3,4\n")
    await _until((inbox / "done" / "week1.csv").exists, "week1.csv in done/")
    host.timings["upload to done/"] = time.monotonic() - started
    # STATUS= is refreshed when a job ends, not at the next periodic update (30 s).
    await _until(lambda: "0 in flight" in host.unit("StatusText")["StatusText"], "StatusText: 0 in flight", 5)

    def finished() -> list[dict[str, Any]]:
        return [r for r in host.daemon_events("EVENT=upload.finished") if "week1.csv" in r["MESSAGE"]]

    [record] = await _until(finished, "upload.finished in the journal")
    job_id = record["JOB_ID"]
    assert record["PRIORITY"] == "6" and record["MODEL"] == "churn" and record["RETRAIN_JOB_ID"]
    assert record["SYSLOG_IDENTIFIER"] == "retrain-uploader"
    # `journalctl -u retrain-uploader JOB_ID=N`: that file's whole story and nothing else.
    story = host.journal(f"JOB_ID={job_id}")
    assert {r["JOB_ID"] for r in story} == {job_id}
    events = [r["EVENT"] for r in story]
    assert events[0] == "job.queued", events
    assert events.index("upload.started") < events.index("upload.finished"), events
    for r in story:  # MESSAGE is the JSON line, and the fields agree with it
        line = json.loads(r["MESSAGE"])
        assert line["event"] == r["EVENT"] and str(line["job_id"]) == job_id
    assert KEY not in json.dumps(story)


async def test_a_bad_csv_is_an_error_found_by_priority_and_fields(host: Host) -> None:
    host.ensure_active()
    inbox = host.box.path(INBOX)
    await _until(inbox.is_dir, "the daemon to create its inbox")
    drop(inbox, "ragged.csv", "id,x\n1,2,3\n")
    await _until((inbox / "failed" / "ragged.csv").exists, "ragged.csv in failed/")

    def failed() -> list[dict[str, Any]]:
        return [r for r in host.daemon_events("-p", "err") if "ragged.csv" in r["MESSAGE"]]

    records = await _until(failed, "job.failed at priority err")
    assert [r["EVENT"] for r in records] == ["job.failed"]
    assert records[0]["PRIORITY"] == "3" and records[0]["MODEL"] == "churn"
    # `-p err` holds errors only; `-p warning MODEL=churn` needs no jq and holds nothing below warning.
    assert all(int(r["PRIORITY"]) <= 3 for r in host.journal("-p", "err"))
    warnings = host.journal("-p", "warning", "MODEL=churn")
    assert warnings and all(int(r["PRIORITY"]) <= 4 and r["MODEL"] == "churn" for r in warnings)
    assert "job.failed" in [r["EVENT"] for r in warnings]
    assert "upload.finished" not in [r["EVENT"] for r in warnings]
    # The README's recipe: `-o cat` mixes systemd's own lines about the unit with the daemon's JSON; fromjson? keeps
    # every daemon line and skips the rest.
    pipe = "journalctl --no-pager -u retrain-uploader -o cat | "
    pipe += ("jq -cR 'fromjson?'" if shutil.which("jq") else  # the container's /usr is the host's
             "python3 -c 'import json,sys\nfor l in sys.stdin:\n  try: print(json.dumps(json.loads(l)))\n"
             "  except ValueError: pass'")
    before = host.cursor()
    parsed = [json.loads(line) for line in host.ok("sh", "-c", pipe).splitlines()]
    expected = [json.loads(r["MESSAGE"]) for r in host.daemon_events() if _seqnum(r["__CURSOR"]) <= before]
    assert parsed[: len(expected)] == expected  # every daemon line, in order, and nothing else
    assert {"job.failed", "upload.finished", "service.started"} <= {p["event"] for p in parsed}


def _readme_block(heading: str, lang: str) -> str:
    """The first ```LANG block after HEADING in deploy/README.md, as an operator would copy it."""
    text = (PROJECT / "deploy" / "README.md").read_text(encoding="utf-8")
    after = text[text.index(heading):]
    start = after.index(f"```{lang}\n") + len(lang) + 4
    return after[start:after.index("```", start)]


def _commands(block: str) -> list[str]:
    """Shell commands of a README block: comments dropped, indented lines continue the one before."""
    commands: list[str] = []
    for line in block.splitlines():
        if line.startswith((" ", "\t")) and commands:
            commands[-1] += "\n" + line
        elif line.strip() and not line.startswith("#"):
            commands.append(line)
    return commands


async def test_the_deploy_readme_journal_recipes_work_as_written(host: Host) -> None:
    host.ensure_active()
    inbox = host.box.path(INBOX)
    await _until(inbox.is_dir, "the daemon to create its inbox")
    drop(inbox, "recipe.csv", "id,x\n1,2\n")
    drop(inbox, "recipe-bad.csv", "id,x\n1\n")
    await _until(lambda: (inbox / "done" / "recipe.csv").exists() and (inbox / "failed" / "recipe-bad.csv").exists(),
                 "recipe.csv in done/ and recipe-bad.csv in failed/")
    job_id = await _until(lambda: next((r["JOB_ID"] for r in host.daemon_events("EVENT=upload.finished")
                                        if "recipe.csv" in r["MESSAGE"]), None), "recipe.csv's upload.finished")
    commands = _commands(_readme_block("## Watching the logs", "sh"))
    assert len(commands) >= 6
    for command in commands:
        # As written, except: no -f (it would never return), and the job id of a job this test made.
        runnable = command.replace(" -f ", " ").replace("JOB_ID=7", f"JOB_ID={job_id}")
        done = host.sh("sh", "-c", runnable)
        assert done.returncode == 0 and done.stdout.strip(), f"{command}\n{done.stdout}{done.stderr}"
        assert "Traceback" not in done.stdout


async def test_the_deploy_readme_logrotate_snippet_rotates_and_the_daemon_writes_on(host: Host) -> None:
    if shutil.which("logrotate", path="/usr/sbin:/usr/bin") is None:  # the container's /usr is the host's
        pytest.skip("logrotate is not installed (apt-get install logrotate; .ci/run does it when root)")
    snippet = _readme_block("### A log file and logrotate", "")
    log = "/var/log/retrain-uploader/daemon.log"
    assert snippet.startswith(log)
    host.ok("sh", "-c", "cat > /etc/logrotate.d/retrain-uploader", input=snippet)
    host.ok("mkdir", "-p", "/var/lib/logrotate")  # the package makes it; this container's /var starts empty
    config = GOOD_CONFIG.replace("[ledger]", f'[logging]\nfile = "{log}"\n\n[ledger]')
    try:
        host.ensure_active(config)
        host.ok("systemctl", "restart", UNIT)  # [logging] is read at start
        inbox = host.box.path(INBOX)
        drop(inbox, "before-rotate.csv", "id,x\n1,2\n")
        await _until(lambda: "before-rotate.csv" in host.box.path(log).read_text(errors="replace")
                     if host.box.path(log).exists() else False, "before-rotate.csv in daemon.log")
        rotate = host.sh("logrotate", "--force", "/etc/logrotate.d/retrain-uploader")
        assert rotate.returncode == 0, rotate.stdout + rotate.stderr
        assert "before-rotate.csv" in host.box.path(log + ".1").read_text(errors="replace")
        drop(inbox, "after-rotate.csv", "id,x\n3,4\n")
        await _until(lambda: "after-rotate.csv" in host.box.path(log).read_text(errors="replace"),
                     "after-rotate.csv in the new daemon.log")
        owner = host.ok("stat", "-c", "%U:%G %a", log).strip()
        assert owner == "retrain-uploader:retrain-uploader 640"
        for line in host.box.path(log).read_text().splitlines():
            json.loads(line)  # JSON lines only, as the README's jq recipe expects
    finally:
        host.write_config(GOOD_CONFIG)
        host.sh("systemctl", "restart", UNIT)


# -- reload ---------------------------------------------------------------------------------------------------------


async def test_reload_of_a_valid_config_is_applied(host: Host) -> None:
    pid = host.ensure_active()
    mark = host.cursor()
    host.write_config(GOOD_CONFIG.replace("settle_s = 0.2", "settle_s = 0.3"))
    reload = host.sh("systemctl", "reload", UNIT)
    assert reload.returncode == 0, reload.stderr
    # `kill -HUP` returns at once: the daemon's RELOADING=1 ... READY=1 may come just after systemctl returned.
    await _until(
        lambda: [r for r in host.daemon_events(after=mark) if r["EVENT"] == "config.reloaded"], "config.reloaded"
    )
    assert host.unit("ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": str(pid)}


async def test_reload_of_an_invalid_config_fails_and_the_running_one_stays(host: Host) -> None:
    pid = host.ensure_active()
    mark = host.cursor()
    host.write_config(BAD_CONFIG)
    reload = host.sh("systemctl", "reload", UNIT)
    assert reload.returncode != 0
    assert host.unit("ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": str(pid)}
    # The reason, as the unit's comment promises: `journalctl -u retrain-uploader -p err`.
    [invalid] = await _until(lambda: host.daemon_events("-p", "err", "EVENT=config.invalid", after=mark),
                             "config.invalid at priority err")
    assert "api.base_url" in json.loads(invalid["MESSAGE"])["error"]
    assert [r["EVENT"] for r in host.daemon_events(after=mark)] == ["config.invalid"]  # no SIGHUP was sent
    # Still running the old config: a new file is uploaded to the emulator (an ftp:// URL could not be).
    inbox = host.box.path(INBOX)
    drop(inbox, "after-bad-reload.csv", "id,x\n5,6\n")
    await _until((inbox / "done" / "after-bad-reload.csv").exists, "after-bad-reload.csv in done/")
    host.write_config(GOOD_CONFIG)


# -- stop, crash, hang ------------------------------------------------------------------------------------------------


def test_stop_exits_0(host: Host) -> None:
    host.ensure_active()
    mark = host.cursor()
    stop = host.sh("systemctl", "stop", UNIT)
    assert stop.returncode == 0, stop.stderr
    unit = host.unit("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert unit == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}
    assert "service.stopped" in [r["EVENT"] for r in host.daemon_events(after=mark)]


async def test_kill_9_is_restarted(host: Host) -> None:
    pid = host.ensure_active()
    restarts = int(host.unit("NRestarts")["NRestarts"])
    host.ok("kill", "-9", str(pid))

    def restarted() -> dict[str, str] | None:
        unit = host.unit("ActiveState", "MainPID", "NRestarts")
        return unit if unit["ActiveState"] == "active" and unit["MainPID"] not in ("0", str(pid)) else None

    started = time.monotonic()
    unit = await _until(restarted, "a new main process after kill -9 (RestartSec=5)")
    host.timings["kill -9 to active"] = time.monotonic() - started
    assert int(unit["NRestarts"]) == restarts + 1


async def test_the_watchdog_kills_and_restarts_a_stopped_daemon(host: Host) -> None:
    host.ok("mkdir", "-p", os.path.dirname(DROPIN))
    host.ok("sh", "-c", f"printf '[Service]\\nWatchdogSec=3s\\n' > {DROPIN}")
    try:
        host.ok("systemctl", "daemon-reload")
        host.ensure_active()
        host.ok("systemctl", "restart", UNIT)
        unit = host.unit("WatchdogUSec", "MainPID", "NRestarts")
        assert unit["WatchdogUSec"] == "3s"
        pid, restarts = unit["MainPID"], int(unit["NRestarts"])
        mark = host.cursor()
        host.ok("kill", "-STOP", pid)

        def restarted() -> dict[str, str] | None:
            unit = host.unit("ActiveState", "MainPID", "NRestarts")
            return unit if unit["ActiveState"] == "active" and unit["MainPID"] not in ("0", pid) else None

        started = time.monotonic()
        unit = await _until(restarted, "the watchdog to kill the stopped daemon and systemd to restart it", 30)
        host.timings["SIGSTOP to active again"] = time.monotonic() - started
        assert int(unit["NRestarts"]) == restarts + 1
        said = [r["MESSAGE"] for r in host.journal(after=mark) if "EVENT" not in r]
        assert any("Watchdog timeout" in m for m in said), said
        assert any("Failed with result 'watchdog'" in m for m in said), said
    finally:
        host.sh("rm", "-f", DROPIN)
        host.sh("systemctl", "daemon-reload")


async def test_a_config_error_at_start_exits_2_and_is_not_restarted(host: Host) -> None:
    host.ensure_active()
    restarts = int(host.unit("NRestarts")["NRestarts"])
    mark = host.cursor()
    host.write_config(BAD_CONFIG)
    try:
        restart = host.sh("systemctl", "restart", UNIT)
        assert restart.returncode != 0  # Type=notify: the start job fails, READY=1 never came
        # Restart=on-failure would put it in "auto-restart"; RestartPreventExitStatus=2 leaves it failed.
        unit = host.unit("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
        assert unit == {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code",
                        "ExecMainStatus": "2", "NRestarts": str(restarts)}
        [invalid] = await _until(lambda: host.daemon_events("-p", "err", "EVENT=config.invalid", after=mark),
                                 "config.invalid at start, at priority err")
        assert "api.base_url" in json.loads(invalid["MESSAGE"])["error"]
    finally:
        host.write_config(GOOD_CONFIG)
