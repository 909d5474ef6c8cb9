"""The error file's ``what_to_do`` names the fix for the failure at hand (issue 10): re-save as CSV UTF-8, fix row N,
the export is empty, not a CSV, the model's rule and its config key, the zip layout. The generic "copy it under a
.part name" advice stays only where a file cut short while being copied is the likely cause."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from retrain_uploader.checks import HINT_EMPTY, HINT_NOT_CSV, HINT_RESAVE_UTF8
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import State

from .conftest import Daemon, drop

GENERIC = "copy it under a .part name"


def zip_bytes(entries: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in entries.items():
            zf.writestr(name, text)
    return buf.getvalue()


def error_file(daemon: Daemon, stem: str, model: str = "alpha") -> dict[str, Any]:
    report: dict[str, Any] = json.loads((daemon.inbox(model) / "failed" / f"{stem}.error.json").read_text())
    return report


async def test_each_refusal_says_what_to_do_about_it(
    start_daemon: Callable[..., Awaitable[Daemon]], tmp_path: Path, emulator: Emulator
) -> None:
    keys = tmp_path / "keys"
    d = await start_daemon(models=[
        {"name": "alpha", "inbox": str(tmp_path / "inbox" / "alpha"), "api_key_file": str(keys / "alpha")},
        # A target name with braces: the runner formats hints with {id}, and must not choke on the config's text.
        {"name": "beta", "inbox": str(tmp_path / "inbox" / "beta"), "api_key_file": str(keys / "beta"),
         "target": "label{x}", "task": "binary"},
    ])
    drop(d.inbox(), "cp1252.csv", "name,city\r\nA,Curaçao\r\nB,Don\u2019t know\r\n", encoding="cp1252")
    drop(d.inbox(), "ragged.csv", "a,b,c\n1,2,3\n4,5,6\n7,8\n")
    drop(d.inbox(), "lonecr.csv", b"a,b\r\n1,2\r\n3,x\ry\r\n")
    drop(d.inbox(), "header.csv", "a,b,c\n")
    drop(d.inbox(), "binary.csv", b"PK\x03\x04\x00\x00binary")
    drop(d.inbox(), "layout.zip", zip_bytes({"data/train.csv": "a,b\n1,2\n"}))
    drop(d.inbox(), "cut.zip", zip_bytes({"train_src/t.csv": "a,b\n1,2\n" * 50})[:60])
    drop(d.inbox("beta"), "notarget.csv", "x,y,label\n1,2,yes\n3,4,no\n")
    jobs = await d.closed_jobs(8)
    assert all(job.state is State.FAILED for job in jobs), [(j.name, j.state, j.error) for j in jobs]

    assert error_file(d, "cp1252")["what_to_do"] == HINT_RESAVE_UTF8
    assert "\"CSV UTF-8 (comma delimited) (*.csv)\"" in HINT_RESAVE_UTF8
    assert error_file(d, "ragged")["what_to_do"] == (
        "Fix row 4 of the file (it has 2 values, the header has 3: a missing or extra comma, or a value holding a "
        "comma without double quotes), save it, and drop it into the inbox again.")
    assert error_file(d, "lonecr")["what_to_do"] == (
        "Fix row 3 of the file (line 3: remove the carriage return (CR) inside a value, or put that value in double "
        "quotes), save it, and drop it into the inbox again.")
    assert error_file(d, "header")["what_to_do"] == HINT_EMPTY
    assert error_file(d, "binary")["what_to_do"] == HINT_NOT_CSV
    layout = error_file(d, "layout")["what_to_do"]
    assert "train_src/<training>.csv and, optionally, eval_src/<evaluation>.csv" in layout and GENERIC not in layout
    assert GENERIC in error_file(d, "cut")["what_to_do"]  # a zip cut short: most likely still being copied
    rule = error_file(d, "notarget", model="beta")["what_to_do"]
    assert rule == (
        "The file breaks the model's rule target = 'label{x}' (its [[models]] entry in the config). Name the column "
        "to predict 'label{x}' in the header row (or add it), then drop it into the inbox again; or, if the rule is "
        "wrong, change `target` in the config, reload the daemon and drop the file again.")
    assert emulator.requests == []
