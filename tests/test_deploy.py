"""deploy/: the systemd unit is valid and hardened, its check can fail, and the install script parses and dry-runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from retrain_uploader.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_LEDGER
from retrain_uploader.config import PoolSettings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "retrain-uploader.service"
VERIFY = DEPLOY / "verify-unit.sh"
INSTALL = DEPLOY / "install.sh"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Unit file → section → key → every value in order (keys repeat, e.g. SystemCallFilter=; case kept)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span in the forms this unit uses: 45, 45s, 1min, 1min 30s."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, value
    return sum(float(n) * units[u] for n, u in parts)


def run(*args: str | Path, timeout: float = 50) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values, f"{key}= is missing from the unit"
    return values[-1]


def test_scripts_are_executable() -> None:
    for script in (VERIFY, INSTALL):
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_unit_lifecycle(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert seconds(one(service, "WatchdogSec")) == 60
    assert one(service, "Restart") == "on-failure"
    assert one(service, "ExecStart") == (
        "/opt/retrain-uploader/venv/bin/retrain-uploader run --config /etc/retrain-uploader/config.toml"
    )
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "User") == one(service, "Group") == "retrain-uploader"
    assert one(service, "StateDirectory") == "retrain-uploader"
    assert "PYTHONUNBUFFERED=1" in service["Environment"]


def test_unit_does_not_restart_what_a_restart_cannot_fix(service: dict[str, list[str]]) -> None:
    prevented = {int(code) for value in service.get("RestartPreventExitStatus", []) for code in value.split()}
    assert {EXIT_CONFIG, EXIT_LEDGER} <= prevented  # a bad config; a damaged or newer-schema ledger
    assert EXIT_FAILURE not in prevented


def test_unit_stop_timeout_exceeds_the_daemons_grace(service: dict[str, list[str]]) -> None:
    timeout = seconds(one(service, "TimeoutStopSec"))
    grace = PoolSettings().shutdown_grace_s
    assert grace == 30
    assert timeout > grace, "systemd would SIGKILL uploads still inside their shutdown grace"


def test_unit_hardening(service: dict[str, list[str]]) -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "RestrictNamespaces": "yes",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0027",
    }
    for key, value in expected.items():
        assert one(service, key) == value, key
    assert one(service, "CapabilityBoundingSet") == ""
    assert one(service, "AmbientCapabilities") == ""
    assert one(service, "RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert service["SystemCallFilter"][0] == "@system-service"
    assert set(service["SystemCallFilter"][1].removeprefix("~").split()) == {"@privileged", "@resources"}
    assert "/srv/retrain" in service["ReadWritePaths"]
    assert "IPAddressDeny" not in service, "the daemon must reach the internet"


@needs_systemd_analyze
def test_verify_unit_passes() -> None:
    result = run(VERIFY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify-unit: OK" in result.stdout


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("good", "bad", "complaint"),
    [
        ("NoNewPrivileges=yes", "NoNewPrivilegs=yes", "Unknown key 'NoNewPrivilegs'"),
        ("Restart=on-failure", "Restart=sometimes", "restart specifier"),
        ("SystemCallFilter=@system-service", "SystemCallFilter=@system-servce", "@system-servce"),
        ("WantedBy=multi-user.target", "WantedBy=multi-user.targt", "multi-user.targt"),
    ],
)
def test_verify_unit_fails_on_a_broken_unit(tmp_path: Path, good: str, bad: str, complaint: str) -> None:
    text = UNIT.read_text(encoding="utf-8")
    assert f"\n{good}\n" in text
    broken = tmp_path / UNIT.name
    broken.write_text(text.replace(f"\n{good}\n", f"\n{bad}\n"), encoding="utf-8")
    result = run(VERIFY, broken)
    assert result.returncode != 0, result.stdout + result.stderr
    assert complaint in result.stderr


def test_install_script_parses() -> None:
    result = run("bash", "-n", INSTALL)
    assert result.returncode == 0, result.stderr


def test_install_dry_run_changes_nothing_and_shows_the_plan() -> None:
    result = run(INSTALL, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "useradd" in out  # the command, or "no useradd needed" where the user exists
    assert "/etc/systemd/system/retrain-uploader.service" in out
    assert "/opt/retrain-uploader/venv" in out
    assert "/etc/retrain-uploader" in out
    assert "-m 0750 -o root -g retrain-uploader /etc/retrain-uploader/keys" in out


def test_install_refuses_unknown_options() -> None:
    result = run(INSTALL, "--dry-run", "--no-such-option")
    assert result.returncode != 0
    assert "unknown option" in result.stderr


def test_install_with_a_wheelhouse_installs_offline_from_it(tmp_path: Path) -> None:
    result = run(INSTALL, "--dry-run", "--wheelhouse", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [pip] = [line for line in result.stdout.splitlines() if " pip install " in line]
    assert f"--no-index --find-links {tmp_path} " in pip
    plain = run(INSTALL, "--dry-run")
    assert "--no-index" not in plain.stdout  # without it, pip uses the configured index as before


def test_install_refuses_a_wheelhouse_that_is_not_a_folder(tmp_path: Path) -> None:
    result = run(INSTALL, "--dry-run", "--wheelhouse", tmp_path / "missing")
    assert result.returncode != 0
    assert "is not a folder" in result.stderr
