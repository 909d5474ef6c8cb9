"""Inboxes, the ledger, the staging folder and the log file must not share ground: such a config is refused with the
keys named (an inbox holding the staging folder had its dropped zips deleted at start)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from retrain_uploader.config import ConfigError, Settings

from ._proc import COMMAND


def settings(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Settings:
    raw: dict[str, Any] = {
        "ledger": {"path": str(tmp_path / "state" / "ledger.sqlite3")},
        "models": [
            {"name": "alpha", "inbox": str(tmp_path / "in" / "alpha"), "api_key_env": "KEY_ALPHA"},
            {"name": "beta", "inbox": str(tmp_path / "in" / "beta"), "api_key_env": "KEY_BETA"},
        ],
    }
    if edit is not None:
        edit(raw)
    return Settings.from_mapping(raw, source=tmp_path / "config.toml")


def _set(section: str, key: str, value: str) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw.setdefault(section, {})[key] = value

    return edit


def _inbox(index: int, value: str) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw["models"][index]["inbox"] = value

    return edit


def _key_file(index: int, value: str) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        model = raw["models"][index]
        del model["api_key_env"]
        model["api_key_file"] = value

    return edit


def _model(index: int, key: str, value: str) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw["models"][index][key] = value

    return edit


def _proxy_password(value: str) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        password = Path(raw["ledger"]["path"]).parent.parent / value  # read at validation: it must exist
        password.parent.mkdir(parents=True)
        password.write_text("secret\n")
        password.chmod(0o600)
        raw["api"] = {"proxy": "http://user@127.0.0.1:3128", "proxy_password_file": value}

    return edit


A, B = "models[0] (alpha).inbox", "models[1] (beta).inbox"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            _set("ledger", "staging_dir", "in/alpha/staging"),
            "ledger.staging_dir ({t}/in/alpha/staging) lies inside {A} ({t}/in/alpha)",
        ),
        (
            _set("ledger", "staging_dir", "in/alpha"),
            "{A} ({t}/in/alpha) is the same folder as ledger.staging_dir ({t}/in/alpha)",
        ),
        (_set("ledger", "staging_dir", "in"), "{A} ({t}/in/alpha) lies inside ledger.staging_dir ({t}/in)"),
        (
            _set("ledger", "path", "in/beta/ledger.sqlite3"),
            "ledger.path ({t}/in/beta/ledger.sqlite3) lies inside {B} ({t}/in/beta)",
        ),
        (
            _set("ledger", "path", "in/ledger.sqlite3"),
            "{A} ({t}/in/alpha) lies inside the folder of ledger.path ({t}/in/ledger.sqlite3)",
        ),
        (_inbox(1, "state"), "ledger.path ({t}/state/ledger.sqlite3) lies inside {B} ({t}/state)"),
        (_inbox(1, "in/alpha/beta"), "{B} ({t}/in/alpha/beta) lies inside {A} ({t}/in/alpha)"),
        (_inbox(1, "in/alpha"), "{B} ({t}/in/alpha) is the same folder as {A} ({t}/in/alpha)"),
        (
            _set("logging", "file", "in/alpha/daemon.log"),
            "logging.file ({t}/in/alpha/daemon.log) lies inside {A} ({t}/in/alpha)",
        ),
        (
            _key_file(0, "in/beta/alpha.key"),
            "models[0] (alpha).api_key_file ({t}/in/beta/alpha.key) lies inside {B} ({t}/in/beta)",
        ),
        (_inbox(0, "."), "the config file ({t}/config.toml) lies inside {A} ({t})"),
        (_inbox(1, "in/alpha/done"), "{B} ({t}/in/alpha/done) lies inside {A} ({t}/in/alpha)"),
        (_inbox(0, "/"), "ledger.path ({t}/state/ledger.sqlite3) lies inside {A} (/)"),
        (
            _model(0, "header_file", "in/alpha/header.csv"),
            "models[0] (alpha).header_file ({t}/in/alpha/header.csv) lies inside {A} ({t}/in/alpha)",
        ),
        (
            _proxy_password("in/beta/proxy.pw"),
            "api.proxy_password_file ({t}/in/beta/proxy.pw) lies inside {B} ({t}/in/beta)",
        ),
    ],
    ids=[
        "staging-in-inbox", "staging-is-inbox", "inbox-in-staging", "ledger-in-inbox", "inbox-in-ledger-folder",
        "inbox-is-ledger-folder", "nested-inboxes", "same-inbox", "log-in-inbox", "key-in-inbox", "config-in-inbox",
        "inbox-is-anothers-done", "inbox-is-root", "header-file-in-inbox", "proxy-password-in-inbox",
    ],
)
def test_an_overlap_is_refused_naming_both_keys(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, edit)
    lines = str(info.value).splitlines()
    assert f"{tmp_path / 'config.toml'}: " + expected.format(t=tmp_path, A=A, B=B) in lines
    assert all(line.startswith(f"{tmp_path / 'config.toml'}: ") for line in lines)


def test_an_overlap_through_a_symlink_is_seen_and_shown_resolved(tmp_path: Path) -> None:
    (tmp_path / "in" / "alpha").mkdir(parents=True)
    (tmp_path / "spool").symlink_to(tmp_path / "in" / "alpha")
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, _set("ledger", "staging_dir", "spool/staging"))
    assert str(info.value) == (
        f"{tmp_path / 'config.toml'}: ledger.staging_dir ({tmp_path}/spool/staging → {tmp_path}/in/alpha/staging)"
        f" lies inside {A} ({tmp_path}/in/alpha)"
    )


@pytest.mark.parametrize(
    "edit",
    [
        None,  # the default: staging beside the ledger
        _set("ledger", "staging_dir", "state"),  # staging is the ledger's folder: its clean-up only touches zips
        _set("ledger", "staging_dir", "state/zips"),
        _set("ledger", "staging_dir", "elsewhere"),
        _set("logging", "file", "state/daemon.log"),
        _inbox(1, "in/alpha-beta"),  # a sibling whose name starts alike is not inside
    ],
)
def test_apart_folders_are_accepted(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None) -> None:
    settings(tmp_path, edit)


def test_every_overlap_is_listed(tmp_path: Path) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["ledger"]["staging_dir"] = str(tmp_path / "in" / "alpha" / "staging")
        raw["models"][1]["inbox"] = str(tmp_path / "in" / "alpha" / "beta")

    with pytest.raises(ConfigError) as info:
        settings(tmp_path, edit)
    assert len(str(info.value).splitlines()) == 2


# -- through the command ------------------------------------------------------------------------------------------


def _write_config(tmp_path: Path, staging: Path) -> Path:
    key = tmp_path / "alpha.key"
    key.write_text("key-alpha-0001\n")
    key.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(
        "[api]\nbase_url = \"http://127.0.0.1:9\"\n"
        f"[ledger]\npath = {json.dumps(str(tmp_path / 'state' / 'ledger.sqlite3'))}\n"
        f"staging_dir = {json.dumps(str(staging))}\n"
        "[watch]\nsettle_s = 0.05\n"
        f"[[models]]\nname = \"alpha\"\ninbox = {json.dumps(str(tmp_path / 'in'))}\n"
        f"api_key_file = {json.dumps(str(key))}\n"
    )
    config.chmod(0o600)
    return config


async def _run(*args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RETRAIN_UPLOADER_CONFIG", "NOTIFY_SOCKET")}
    proc = await asyncio.create_subprocess_exec(
        *COMMAND, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        proc.kill()
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()
        raise AssertionError(f"`{' '.join(args[:1])}` did not refuse the config: it kept running") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize("command", ["check-config", "run"])
async def test_the_command_refuses_staging_inside_an_inbox_and_keeps_the_users_zip(
    tmp_path: Path, command: str
) -> None:
    staging = tmp_path / "in" / "staging"
    staging.mkdir(parents=True)
    dropped = staging / "the-users.zip"  # a zip the user dropped in a sub-folder of the inbox
    dropped.write_bytes(b"PK\x05\x06" + bytes(18))
    config = _write_config(tmp_path, staging)
    code, err = await _run(command, "--config", str(config))
    assert code == 2, err
    assert f"{config}: ledger.staging_dir ({staging}) lies inside models[0] (alpha).inbox ({tmp_path / 'in'})" in err
    assert dropped.exists()
    assert not (tmp_path / "state").exists()  # refused before anything was created
