"""A key source that is not a small regular file (a FIFO, a device, a 150 MB file) is refused with a clear error at
once: it never hangs `check-config` or a reload, and is never read whole. Real FIFOs, real files, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from retrain_uploader.config import ConfigError, Settings

from ._proc import COMMAND

_ENV = {k: v for k, v in os.environ.items() if k not in ("RETRAIN_UPLOADER_CONFIG", "NOTIFY_SOCKET")}


def _config(tmp_path: Path, key_file: Path, **api: str) -> Path:
    config = tmp_path / "config.toml"
    api_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in api.items())
    config.write_text(
        f"[api]\nbase_url = \"http://127.0.0.1:9\"\n{api_lines}"
        f"[ledger]\npath = {json.dumps(str(tmp_path / 'state' / 'ledger.sqlite3'))}\n"
        f"[[models]]\nname = \"alpha\"\ninbox = {json.dumps(str(tmp_path / 'in'))}\n"
        f"api_key_file = {json.dumps(str(key_file))}\n"
    )
    config.chmod(0o600)
    return config


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "alpha.key"
    os.mkfifo(path, 0o600)
    return path


def huge(tmp_path: Path) -> Path:
    path = tmp_path / "alpha.key"
    with open(path, "wb") as f:
        f.truncate(150 << 20)  # sparse: 150 MB to read, no disk used
    path.chmod(0o600)
    return path


def folder(tmp_path: Path) -> Path:
    path = tmp_path / "alpha.key"
    path.mkdir()
    return path


@pytest.mark.parametrize(("make", "complaint"), [
    (fifo, "is not a regular file"),
    (huge, "is larger than"),
    (folder, "is not a regular file"),
])
def test_check_config_refuses_an_odd_key_file_at_once(tmp_path: Path, make: object, complaint: str) -> None:
    assert callable(make)
    key = make(tmp_path)
    config = _config(tmp_path, key)
    started = time.monotonic()
    try:
        done = subprocess.run([*COMMAND, "check-config", "--config", str(config)], capture_output=True, text=True,
                              timeout=20, env=_ENV, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("check-config hung on the key file")
    assert time.monotonic() - started < 15
    assert done.returncode == 2, done.stderr
    assert f"models.alpha.api_key_file: key file {key} {complaint}" in done.stderr
    assert "Traceback" not in done.stderr


def test_reading_a_key_from_a_fifo_returns_at_once(tmp_path: Path) -> None:
    settings = Settings.from_toml(_config(tmp_path, fifo(tmp_path)))
    with pytest.raises(ConfigError, match="is not a regular file"):
        settings.model("alpha").read_api_key()


def test_a_proxy_password_fifo_is_refused_at_once(tmp_path: Path) -> None:
    key = tmp_path / "alpha.key"
    key.write_text("key-alpha-0001\n")
    password = tmp_path / "proxy.pw"
    os.mkfifo(password, 0o600)
    with pytest.raises(ConfigError, match=f"proxy_password_file: {password} is not a regular file"):
        Settings.from_toml(_config(tmp_path, key, proxy="http://user@127.0.0.1:3128",
                                   proxy_password_file=str(password)))
