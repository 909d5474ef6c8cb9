"""`retrain-uploader check` as a real process: both outputs, exit codes, the ledger only read, no API call."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import Ledger, State

from ._proc import COMMAND, write_config

GOOD = "x,y,label\n1,2,yes\n3,4,no\n5,6,yes\n"
THREE = "x,y,label\n1,2,a\n3,4,b\n5,6,c\n"


async def run_check(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *COMMAND, "check", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def config_with_rules(tmp_path: Path, emulator: Emulator) -> Path:
    config = write_config(tmp_path, emulator.base_url)
    with config.open("a", encoding="utf-8") as f:  # the last [[models]] table is alpha's
        f.write('target = "label"\ntask = "binary"\n')
    return config


async def test_json_output_exit_codes_and_no_api_call(tmp_path: Path, emulator: Emulator) -> None:
    config = config_with_rules(tmp_path, emulator)
    data = tmp_path / "pipeline"
    data.mkdir()
    (data / "good.csv").write_text(GOOD)
    (data / "three.csv").write_text(THREE)
    (data / "s.train.csv").write_text(GOOD)
    (data / "s.eval.csv").write_text(GOOD)
    code, out, _ = await run_check("--config", str(config), "--model", "alpha", "--json",
                                   *(str(data / n) for n in ("good.csv", "three.csv", "s.train.csv", "s.eval.csv")))
    lines = [json.loads(line) for line in out.splitlines()]
    by_path = {line["path"]: line for line in lines}
    assert code == 1
    good = by_path[str(data / "good.csv")]
    assert good == {**good, "ok": True, "reason": None, "warnings": [], "upload_filename": "good.csv",
                    "size_bytes": len(GOOD), "sha256": hashlib.sha256(GOOD.encode()).hexdigest()}
    bad = by_path[str(data / "three.csv")]
    assert bad["ok"] is False and "binary but target 'label' has 3 distinct value(s)" in bad["reason"]
    pair = by_path[f"{data / 's.train.csv'} + {data / 's.eval.csv'}"]
    assert (pair["ok"], pair["upload_filename"], pair["kind"]) == (True, "s.zip", "pair")
    assert emulator.requests == []
    assert sorted(p.name for p in data.iterdir()) == ["good.csv", "s.eval.csv", "s.train.csv", "three.csv"]


async def test_human_output_and_exit_0(tmp_path: Path, emulator: Emulator) -> None:
    config = config_with_rules(tmp_path, emulator)
    good = tmp_path / "good.csv"
    good.write_text(GOOD)
    code, out, _ = await run_check("--config", str(config), "--model", "alpha", str(good))
    assert (code, out) == (0, f"OK      {good} -> good.csv\n")
    bad = tmp_path / "three.csv"
    bad.write_text(THREE)
    code, out, _ = await run_check("--config", str(config), "--model", "alpha", str(bad))
    assert code == 1 and out.startswith(f"REFUSED {bad}\n        three.csv: task is binary")
    assert emulator.requests == []


async def test_usage_and_config_errors_exit_2(tmp_path: Path, emulator: Emulator) -> None:
    config = config_with_rules(tmp_path, emulator)
    code, _, err = await run_check("--config", str(config), "--model", "nope", str(tmp_path / "x.csv"))
    assert code == 2 and "no model 'nope'" in err
    code, _, _ = await run_check("--config", str(config))  # no PATH
    assert code == 2
    code, _, err = await run_check("--config", str(tmp_path / "missing.toml"), str(tmp_path / "x.csv"))
    assert code == 2 and "cannot read the config file" in err


async def test_already_sent_from_the_ledger_read_only(tmp_path: Path, emulator: Emulator) -> None:
    config = config_with_rules(tmp_path, emulator)
    ledger_path = tmp_path / "state" / "ledger.sqlite3"
    digest = hashlib.sha256(GOOD.encode()).hexdigest()
    with Ledger(ledger_path) as ledger:
        job = ledger.create_job(model="alpha", kind="csv", name="good", sources=["good.csv"],
                                upload_filename="good.csv")
        ledger.update(job.id, state=State.UPLOADED, content_sha256=digest, sha256=digest)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ledger_path.parent.iterdir()}
    good = tmp_path / "good.csv"
    good.write_text(GOOD)
    code, out, _ = await run_check("--config", str(config), "--model", "alpha", "--json", str(good))
    line = json.loads(out)
    assert (code, line["ok"], line["already_sent_as_job"]) == (0, True, job.id)
    assert f"already sent as job {job.id} (uploaded)" in line["warnings"][0]
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ledger_path.parent.iterdir()}
    assert after == before


async def test_a_refusal_shows_what_to_do_in_both_outputs(tmp_path: Path, emulator: Emulator) -> None:
    config = config_with_rules(tmp_path, emulator)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("x,y,label\n1,2,yes\n3,4\n")
    good = tmp_path / "good.csv"
    good.write_text(GOOD)
    advice = ("Fix row 3 of the file (it has 2 values, the header has 3: a missing or extra comma, or a value holding "
              "a comma without double quotes), save it, and drop it into the inbox again.")
    code, out, _ = await run_check("--config", str(config), "--json", str(ragged), str(good))
    by_path = {line["path"]: line for line in map(json.loads, out.splitlines())}
    assert code == 1
    assert by_path[str(ragged)]["what_to_do"] == advice
    assert by_path[str(good)]["what_to_do"] is None
    code, out, _ = await run_check("--config", str(config), str(ragged))
    assert code == 1
    assert out == (f"REFUSED {ragged}\n        ragged.csv: row 3 has 2 columns, the header has 3; check for missing or "
                   "extra commas, and put values that contain a comma in double quotes\n"
                   f"        what to do: {advice}\n")
    assert emulator.requests == []
