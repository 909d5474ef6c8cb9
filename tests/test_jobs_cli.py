"""`retrain-uploader jobs` as an operator's history: the listing (newest 50, --since, --limit), one job's whole story
(`jobs show ID [--json]`), columns aligned by display width, and a quiet end when the reader closes the pipe.
Real subprocesses against a real ledger; the story is written by really running the daemon against the emulator."""

from __future__ import annotations

import json
import subprocess
import time
import unicodedata
from pathlib import Path

from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import Ledger, State

from . import test_cli
from .conftest import drop
from .test_cli import COMMAND, CSV, RAGGED, SENT, StartDaemon, _env, cli

config = test_cli.config  # the CLI's config file and keys, as a fixture


def display_width(text: str) -> int:
    """Terminal cells, counted here independently of the program: wide and fullwidth two, combining marks none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text
    )


def fill(ledger_path: Path, names: list[str], *, at: float | None = None) -> list[int]:
    """Jobs created through the ledger's own API (optionally at a past time), closed, each with a retrain job id."""
    clock = (lambda: at) if at is not None else time.time
    ids = []
    with Ledger(ledger_path, clock=clock) as ledger:
        for name in names:
            job = ledger.create_job(model="alpha", kind="csv", name=name, sources=[name], upload_filename=name)
            ledger.update(job.id, state=State.UPLOADED, retrain_job_id=f"rj-{job.id:04d}", closed=1, event="state")
            ids.append(job.id)
    return ids


def ledger_of(config: Path) -> Path:
    return config.parent / "state" / "ledger.sqlite3"


# -- jobs show ----------------------------------------------------------------------------------------------------


async def test_jobs_show_tells_one_jobs_whole_story_in_order(
    start_daemon: StartDaemon, emulator: Emulator, config: Path
) -> None:
    from retrain_uploader.config import Settings

    emulator.inject("upload_url", "http_status", status=503)  # one failed attempt, then a retrain job id
    d = await start_daemon(Settings.from_toml(config))
    drop(d.inbox("alpha"), "来店予測.csv", CSV)
    drop(d.inbox("alpha"), "ragged.csv", RAGGED)
    jobs = await d.closed_jobs(2)
    assert await d.stop() == 0
    good = next(j for j in jobs if j.upload_filename == "来店予測.csv")
    bad = next(j for j in jobs if j.upload_filename == "ragged.csv")
    assert good.state in SENT and bad.state is State.FAILED

    shown = await cli("jobs", "show", str(good.id), "--json", "--config", config)
    assert shown.code == 0, shown
    doc = json.loads(shown.out)
    assert shown.out.count("\n") == 1  # one object
    assert {k: v for k, v in doc.items() if k in good.as_dict()} == good.as_dict()
    assert doc["closed"] is True
    assert doc["events"] == d.events(good.id)  # every event of it, in ledger order, each with at / event / detail
    assert all(set(e) == {"at", "event", "detail"} for e in doc["events"])
    names = [e["event"] for e in doc["events"]]
    assert names[0] == "created" and "upload_url" in names and names.index("upload_url") < len(names) - 1
    assert any(e["detail"].get("retrain_job_id") == good.retrain_job_id for e in doc["events"] if e["detail"])
    assert [e["at"] for e in doc["events"]] == sorted(e["at"] for e in doc["events"])

    # options before `show` count as well as after it
    before = await cli("jobs", "--config", config, "--json", "show", str(good.id))
    assert json.loads(before.out) == doc

    text = await cli("jobs", "show", str(bad.id), "--config", config)
    assert text.code == 0, text
    lines = text.out.splitlines()
    assert lines[0] == f"job {bad.id}  model alpha"
    assert any(line.split(":", 1)[0].strip() == "error" and bad.error in line for line in lines)
    event_lines = lines[lines.index(next(line for line in lines if line.startswith("events ("))) + 1 :]
    assert [line.split()[1] for line in event_lines] == [e["event"] for e in d.events(bad.id)]

    missing = await cli("jobs", "show", "999", "--config", config)
    assert (missing.code, missing.out) == (1, "") and "no job 999 in the ledger" in missing.err
    assert "Traceback" not in missing.err


# -- listing: newest 50, --limit, --since ------------------------------------------------------------------------


async def test_the_listing_shows_the_newest_50_and_says_how_many_it_left_out(config: Path) -> None:
    ids = fill(ledger_of(config), [f"f{i:02d}.csv" for i in range(60)])

    text = await cli("jobs", "--config", config)
    assert text.code == 0, text
    header, *rows, footer = text.out.splitlines()
    assert header.split()[0] == "id"
    assert [int(r.split()[0]) for r in rows] == ids[-50:]  # the newest 50, oldest of them first
    assert footer == "(10 older job(s) not shown; use --limit N or --since)"

    five = await cli("jobs", "--limit", "5", "--config", config)
    assert [int(r.split()[0]) for r in five.out.splitlines()[1:-1]] == ids[-5:]
    assert five.out.splitlines()[-1].startswith("(55 older job(s) not shown")

    every = await cli("jobs", "--limit", "100", "--config", config)
    assert len(every.out.splitlines()) == 61 and "not shown" not in every.out

    as_json = await cli("jobs", "--json", "--config", config)  # machines get every job unless they limit it
    assert [json.loads(line)["id"] for line in as_json.out.splitlines()] == ids
    three = await cli("jobs", "--json", "--limit", "3", "--config", config)
    assert [json.loads(line)["id"] for line in three.out.splitlines()] == ids[-3:]

    for bad in ("0", "-1", "many"):
        refused = await cli("jobs", "--limit", bad, "--config", config)
        assert refused.code == 2 and "expected a whole number" in refused.err, refused


async def test_since_takes_a_duration_or_a_date(config: Path) -> None:
    now = time.time()
    old = fill(ledger_of(config), ["old.csv"], at=now - 3 * 86400)
    recent = fill(ledger_of(config), ["recent.csv"], at=now - 3600)
    fresh = fill(ledger_of(config), ["fresh.csv"])

    async def listed(*args: str) -> list[int]:
        result = await cli("jobs", "--json", *args, "--config", config)
        assert result.code == 0, result
        return [json.loads(line)["id"] for line in result.out.splitlines()]

    assert await listed("--since", "2d") == recent + fresh
    assert await listed("--since", "90m") == recent + fresh
    assert await listed("--since", "30m") == fresh
    assert await listed("--since", "1h30m") == recent + fresh
    assert await listed("--since", "1w") == old + recent + fresh
    two_days_ago = time.strftime("%Y-%m-%dT%H:%M", time.localtime(now - 2 * 86400))  # local time, as typed
    assert await listed("--since", two_days_ago) == recent + fresh
    assert await listed("--since", "2d", "--limit", "1") == fresh
    text = await cli("jobs", "--since", "2d", "--config", config)
    assert [int(line.split()[0]) for line in text.out.splitlines()[1:]] == recent + fresh

    refused = await cli("jobs", "--since", "yesterday", "--config", config)
    assert refused.code == 2 and "expected a duration (90m, 2h, 7d" in refused.err, refused


# -- display width ------------------------------------------------------------------------------------------------


async def test_columns_line_up_by_display_width_with_japanese_names(config: Path) -> None:
    names = ["来店予測.csv", "a.csv", "ｶﾀｶﾅ.csv", "売上_2026年11月_店舗別.csv", "cafe\u0301.csv"]
    fill(ledger_of(config), names)
    text = await cli("jobs", "--config", config)
    assert text.code == 0, text
    lines = text.out.splitlines()
    # Where each column starts on screen: the same cell on every line (header included).
    for column in ("retrain_job_id", "updated_at"):
        header_at = display_width(lines[0][: lines[0].index(column)])
        for line in lines[1:]:
            value = next(v for v in line.split() if v.startswith("rj-")) if column == "retrain_job_id" else None
            value = value or line.split()[-1]
            assert display_width(line[: line.index(value)]) == header_at, (column, lines)
    assert {display_width(line) for line in lines[1:]} == {display_width(lines[1])}


# -- a closed pipe ------------------------------------------------------------------------------------------------


def test_a_reader_that_stops_early_gets_no_traceback(config: Path) -> None:
    # Enough output to fill the pipe several times over, so the writer is still writing when `head` exits.
    fill(ledger_of(config), [f"{'x' * 150}-{i:04d}.csv" for i in range(400)])
    exe = " ".join(COMMAND)
    for args in ("jobs --json", "jobs --limit 400"):
        script = f'{exe} {args} --config "$1" | head -c 100 >/dev/null; echo "exit=${{PIPESTATUS[0]}}" >&2'
        done = subprocess.run(
            ["bash", "-c", script, "bash", str(config)], capture_output=True, text=True, timeout=30, env=_env()
        )
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, (args, done.stderr)
        assert done.stderr.strip().endswith("exit=0"), (args, done.stderr)
