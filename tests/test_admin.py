"""Read-only operator commands beside a busy daemon: files and rows change under them, names may not be UTF-8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from retrain_uploader.admin import collect
from retrain_uploader.config import Settings
from retrain_uploader.emulator import Emulator

from ._proc import COMMAND, write_config

# Moves every file of an inbox into done/, the way the daemon drains it, as a separate process (real concurrency).
_DRAIN = """
import os, sys
inbox = sys.argv[1]
names = sorted(n for n in os.listdir(inbox) if n.endswith(".csv"))
print("ready", flush=True)
for name in names:
    os.rename(os.path.join(inbox, name), os.path.join(inbox, "done", name))
"""


def test_status_tolerates_an_inbox_draining_under_it(tmp_path: Path, emulator: Emulator) -> None:
    settings = Settings.from_toml(write_config(tmp_path, emulator.base_url))
    inbox = settings.model("alpha").inbox
    (inbox / "done").mkdir(parents=True)
    for i in range(3000):
        (inbox / f"f{i:05}.csv").write_text("id\n1\n")
    reports, errors = 0, []
    with subprocess.Popen([sys.executable, "-c", _DRAIN, str(inbox)], stdout=subprocess.PIPE, text=True) as drain:
        assert drain.stdout is not None and drain.stdout.readline() == "ready\n"
        while drain.poll() is None:
            try:
                collect(settings, None)
            except OSError as e:
                errors.append(repr(e))
            reports += 1
    assert drain.returncode == 0
    assert errors == []
    assert reports >= 2  # it did look while the files moved
    [alpha] = collect(settings, None)["models"]
    assert (alpha["files_waiting"], alpha["oldest_waiting_file"]) == (0, None)


def test_status_shows_a_name_that_is_not_utf8_escaped(tmp_path: Path, emulator: Emulator) -> None:
    config = write_config(tmp_path, emulator.base_url)
    inbox = Settings.from_toml(config).model("alpha").inbox
    inbox.mkdir(parents=True)
    fd = os.open(os.fsencode(inbox) + b"/caf\xe9.csv", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if k not in ("RETRAIN_UPLOADER_CONFIG", "CREDENTIALS_DIRECTORY")}
    env["PYTHONIOENCODING"] = "utf-8"
    as_json = subprocess.run([*COMMAND, "status", "--json", "--config", str(config)], capture_output=True, env=env,
                             timeout=30, check=False)
    assert as_json.returncode == 0, as_json.stderr.decode(errors="replace")
    [alpha] = json.loads(as_json.stdout.decode("utf-8"))["models"]
    assert (alpha["files_waiting"], alpha["oldest_waiting_file"]["file"]) == (1, "caf\\xe9.csv")
    as_text = subprocess.run([*COMMAND, "status", "--config", str(config)], capture_output=True, env=env,
                             timeout=30, check=False)
    assert as_text.returncode == 0, as_text.stderr.decode(errors="replace")
    assert "1 file(s) in the inbox, oldest 'caf\\\\xe9.csv'" in as_text.stdout.decode("utf-8")
