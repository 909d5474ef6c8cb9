"""One pass over a large CSV: hashed first (duplicates before any API call), then checked while it is sent, with the
PUT's last byte held back until the check has passed."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import itertools
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrain_uploader import checks, packager
from retrain_uploader.checks import InputError
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import State
from retrain_uploader.rules import model_rules
from retrain_uploader.streamcheck import StreamCheck

from .conftest import drop, wait_for
from .test_checks import tokens

ONE_PASS = {"stream_check_min_bytes": 1}  # every non-empty CSV is checked while it is sent


def big_csv(rows: int, *, bad_row: int | None = None) -> bytes:
    """A numeric export of ``rows`` data rows (~13 bytes each); ``bad_row`` (spreadsheet numbering) has a column
    too many."""
    lines = [b"id,amount,label\n"]
    lines += [b"%d,%d,%d\n" % (i, i * 7 % 1000, i % 2) for i in range(rows)]
    if bad_row is not None:
        lines[bad_row - 1] = b"%d,1,0,extra\n" % bad_row
    return b"".join(lines)


def error_file(inbox: Path, name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((inbox / "failed" / f"{name}.error.json").read_text())
    return loaded


async def test_a_csv_failing_its_check_mid_stream_is_cut_before_its_last_byte(
    start_daemon, emulator: Emulator, tmp_path: Path
) -> None:
    content = big_csv(400_000, bad_row=200_000)  # ~5 MB, the ragged row about halfway
    expected = tmp_path / "reference" / "bad.csv"
    expected.parent.mkdir()
    expected.write_bytes(content)
    with pytest.raises(InputError) as checked_before:  # what the check says when it runs before the upload
        packager.package_csv(expected)

    d = await start_daemon(packaging=ONE_PASS)
    drop(d.inbox(), "bad.csv", content)
    [job] = await d.closed_jobs(1)

    assert job.state is State.FAILED
    assert job.error == str(checked_before.value)
    events = [e["event"] for e in d.events(job.id)]
    assert events.index("upload_url") < events.index("check_failed")  # it was being sent when the check failed
    [cut] = [e for e in d.events(job.id) if e["event"] == "check_failed"]
    assert 0 < cut["detail"]["sent"] < len(content)  # cut mid-stream, long before its last byte
    # The storage keeps no object and no retraining starts.
    assert emulator.uploads == []
    assert list((tmp_path / "emulator-store").iterdir()) == []
    assert all(j.uploads == 0 and j.retrain_started_at is None for j in emulator.jobs.values())
    # It fails as a check before the upload does: same reason, same advice, the file in failed/.
    error = error_file(d.inbox(), "bad")
    assert error["error"] == str(checked_before.value)
    assert error["failed_at_state"] == "packaging"
    assert checked_before.value.hint and error["what_to_do"] == checked_before.value.hint  # the row to fix
    assert (d.inbox() / "failed" / "bad.csv").read_bytes() == content


async def test_a_csv_whose_last_row_is_bad_never_sends_its_last_byte(
    start_daemon, emulator: Emulator, tmp_path: Path
) -> None:
    rows = 300_000
    content = big_csv(rows, bad_row=rows + 1)  # the last row: the check can only fail once every byte was read
    d = await start_daemon(packaging=ONE_PASS)
    drop(d.inbox(), "last.csv", content)
    [job] = await d.closed_jobs(1)

    assert job.state is State.FAILED
    assert f"row {rows + 1} has 4 columns" in (job.error or "")
    [cut] = [e for e in d.events(job.id) if e["event"] == "check_failed"]
    assert cut["detail"]["sent"] < len(content)
    assert emulator.uploads == []
    assert all(j.uploads == 0 for j in emulator.jobs.values())


async def test_a_good_csv_is_checked_while_it_is_sent_and_its_header_recorded_after(
    start_daemon, emulator: Emulator
) -> None:
    content = big_csv(300_000)
    d = await start_daemon(packaging=ONE_PASS)
    drop(d.inbox(), "good.csv", content)
    [job] = await d.closed_jobs(1)

    assert job.uploaded_at is not None
    assert [u.sha256 for u in emulator.uploads] == [hashlib.sha256(content).hexdigest()]
    assert job.header == ("id", "amount", "label")
    events = [e["event"] for e in d.events(job.id)]
    # Hashed (no header yet) before any API call; checked during the PUT; recorded before "uploaded".
    assert events.index("packaged") < events.index("upload_url") < events.index("checked") < events.index("uploaded")
    [checked] = [e for e in d.events(job.id) if e["event"] == "checked"]
    assert checked["detail"]["rows"] == 300_000


async def test_a_cp932_csv_is_checked_in_full_before_its_upload(start_daemon, emulator: Emulator) -> None:
    # Not UTF-8: its check would read it a second time (as cp932) while the PUT held its last byte, long enough to
    # look like a stalled upload (tests/test_hard_windows.py); it is checked before the upload instead.
    rows = ["id,都道府県,label"] + [f"{i},{'東京都' if i % 2 else '大阪府'},{i % 2}" for i in range(200_000)]
    content = ("\r\n".join(rows) + "\r\n").encode("cp932")
    d = await start_daemon(packaging=ONE_PASS)
    drop(d.inbox(), "sjis.csv", content)
    [job] = await d.closed_jobs(1)

    assert job.uploaded_at is not None
    assert job.header == ("id", "都道府県", "label")
    assert [u.sha256 for u in emulator.uploads] == [hashlib.sha256(content).hexdigest()]
    assert [e for e in d.events(job.id) if e["event"] == "checked"] == []  # checked at packaging, not while sent


async def test_a_duplicate_of_a_large_csv_is_found_before_any_api_call(start_daemon, emulator: Emulator) -> None:
    content = big_csv(300_000)
    d = await start_daemon(packaging=ONE_PASS)
    drop(d.inbox(), "first.csv", content)
    await d.closed_jobs(1)
    calls = len(emulator.requests)
    drop(d.inbox(), "again.csv", content)
    _first, second = await d.closed_jobs(2)

    assert second.state is State.DUPLICATE
    assert len(emulator.uploads) == 1
    assert [r.endpoint for r in emulator.requests[calls:]].count("upload_url") == 0
    assert "checked" not in [e["event"] for e in d.events(second.id)]


async def test_a_large_csv_changed_mid_put_never_completes_a_put(start_daemon, emulator: Emulator) -> None:
    before = big_csv(400_000)  # ~5 MB at 4 MB/s: the PUT is still reading it when the file changes
    after = before.replace(b"\n399999,", b"\n399990,")
    assert len(after) == len(before) and after != before
    d = await start_daemon(packaging=ONE_PASS, upload={"max_bytes_per_s": 4_000_000})
    path = drop(d.inbox(), "moving.csv", before)
    await wait_for(lambda: any(r.endpoint == "put" for r in emulator.requests), what="the PUT started")
    with path.open("r+b") as f:  # rewritten in place, same size: only the digest can tell
        f.write(after)
    [job] = await d.closed_jobs(1, timeout=20)

    assert [u.sha256 for u in emulator.uploads] == [hashlib.sha256(after).hexdigest()]
    retries = [e for e in d.events(job.id) if e["event"] == "retry"]
    assert retries
    assert "changed" in retries[0]["detail"]["error"]


# -- the streamed check judges exactly like the check run before an upload --------------------------------------------
def streamed_outcome(data: bytes, cuts: list[int]) -> tuple[str, str, tuple[str, ...], int] | str:
    """Feed ``data`` to a StreamCheck in pieces cut at ``cuts`` (as a PUT reads it), from a real file for the cp932
    second reading."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.csv"
        path.write_bytes(data)

        async def run() -> checks.CsvReport:
            check = StreamCheck(functools.partial(packager.check_sent_csv, name="t.csv"), path=path,
                                sha256=hashlib.sha256(data).hexdigest())
            check.start()
            try:
                bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
                for a, b in itertools.pairwise(bounds):
                    await check.feed(data[a:b])
                return await check.verdict()
            finally:
                await check.close()

        try:
            r = asyncio.run(run())
        except InputError as e:
            return str(e)
    assert r.size_bytes == len(data)
    return r.encoding, r.delimiter, r.header, r.rows


def before_outcome(data: bytes) -> tuple[str, str, tuple[str, ...], int] | str:
    try:
        r = packager.check_sent_csv(io.BytesIO(data), name="t.csv")
    except InputError as e:
        return str(e)
    return r.encoding, r.delimiter, r.header, r.rows


@settings(max_examples=300, deadline=None)
@given(st.lists(tokens, max_size=60).map(b"".join), st.lists(st.integers(0, 1 << 16), max_size=6))
def test_the_streamed_check_judges_any_bytes_like_the_check_before(data: bytes, cuts: list[int]) -> None:
    assert streamed_outcome(data, cuts) == before_outcome(data)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["utf-8", "utf-8-sig", "cp932"]), st.sampled_from(["\n", "\r\n"]),
       st.integers(1, 3000), st.lists(st.integers(0, 1 << 20), max_size=4))
def test_the_streamed_check_judges_written_tables_like_the_check_before(
    encoding: str, term: str, rows: int, cuts: list[int]
) -> None:
    lines = ["id,name,label", *(f'{i},"{"a ""b""" if i % 3 == 1 else "東京, 都"}",{i % 2}' for i in range(rows))]
    data = (term.join(lines) + term).encode(encoding)
    got = streamed_outcome(data, cuts)
    assert got == before_outcome(data)
    assert got == (encoding, ",", ("id", "name", "label"), rows)


async def test_model_rules_run_in_the_streamed_check(start_daemon, emulator: Emulator, tmp_path: Path) -> None:
    """A regression target that is not a number in the last row fails the rules at the end of the stream: the PUT is
    cut before its last byte and the job fails with the rules' own message."""
    content = big_csv(300_000) + b"300000,1,12 kg\n"
    reference = tmp_path / "reference" / "three.csv"
    reference.parent.mkdir()
    reference.write_bytes(content)
    models = [{"name": "alpha", "inbox": str(tmp_path / "inbox" / "alpha"), "target": "label", "task": "regression",
               "api_key_file": str(tmp_path / "keys" / "alpha")}]
    d = await start_daemon(packaging=ONE_PASS, models=models)
    rules = d.settings.model("alpha")
    with pytest.raises(InputError) as checked_before:
        packager.package_csv(reference, rules=model_rules(rules, None))
    drop(d.inbox(), "three.csv", content)
    [job] = await d.closed_jobs(1)

    assert job.state is State.FAILED
    assert job.error == str(checked_before.value)
    assert "is not a number in row 300002" in str(job.error)
    assert "check_failed" in [e["event"] for e in d.events(job.id)]
    assert emulator.uploads == []


def quoted_cp932_csv(rows: int) -> bytes:
    """A Japanese Excel export ("CSV (comma delimited)" is cp932) with a quoted text column: the slow csv path."""
    lines = ["番号,金額,備考,ラベル"] + [f'{i},{i * 7 % 1000},"東京都港区、""品川"" {i}",{i % 2}' for i in range(rows)]
    return ("\r\n".join(lines) + "\r\n").encode("cp932")


async def test_a_cp932_csv_whose_second_reading_outlasts_the_put_watchdog_is_still_uploaded(
    start_daemon, emulator: Emulator, tmp_path: Path
) -> None:
    """Found by review: the cp932 second reading ran while the PUT held its last byte and nothing moved on the
    connection; past [api] upload_read_timeout_s (a real storage's own idle limit is the same shape) the PUT was
    aborted as stalled, again through a fresh URL each time, and a good file failed. A CSV that is not UTF-8 is now
    checked in full before its upload."""
    content = quoted_cp932_csv(500_000)  # ~22 MB, its second reading ~1.3-3 s on this machine
    d = await start_daemon(packaging=ONE_PASS, api={"upload_read_timeout_s": 0.3},
                           retry={"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05})
    drop(d.inbox(), "sjis.csv", content)
    [job] = await d.closed_jobs(1, timeout=40)

    assert job.state is not State.FAILED, job.error
    assert [u.sha256 for u in emulator.uploads] == [hashlib.sha256(content).hexdigest()]
    assert [r.endpoint for r in emulator.requests].count("upload_url") == 1


@pytest.mark.parametrize("data", [
    # Not UTF-8: an E3 cut short by "a", its two continuation bytes after the comma. With the ASCII bytes taken out the
    # three run together into a valid "あ", so the hash-first screen lets it through; cp932 reads it (a kanji, then
    # a symbol) and the streamed check must say exactly what the check before an upload says.
    b"h1,h2\n\xe3a,\x81\x82\n1,2\n",
    b"h1,h2\n1,\xe3\n\x81\x82,2\n",  # cut by a line break
])
def test_a_non_utf8_csv_let_through_by_the_hash_screen_is_still_judged_exactly(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(UnicodeDecodeError):
        data.decode()
    path = tmp_path / "t.csv"
    path.write_bytes(data)
    hashed = packager.hash_csv(path)

    assert hashed is not None  # routed to the streamed check (one pass), not refused by the screen
    assert hashed.sha256 == hashlib.sha256(data).hexdigest()
    assert hashed.checked is False
    assert streamed_outcome(data, [7]) == before_outcome(data)


@pytest.mark.parametrize("data", [
    "id,都道府県\n1,東京都\n".encode("cp932"),
    b"h1,h2\n\x81,1\n",  # a continuation byte alone
    b"h1,h2\n1,\xe3\x81",  # cut short at the end of the file
    "h1,h2\n1,東京\n".encode() + b"\xff\n" + b"2,3\n" * 300_000,  # one bad byte, then megabytes of ASCII
])
def test_a_csv_that_is_not_utf8_is_routed_to_the_check_before_its_upload(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(data)
    assert packager.hash_csv(path) is None


def test_the_hash_screen_passes_utf8_split_anywhere_across_reads(tmp_path: Path) -> None:
    # Every offset of a 3-byte character against the 1 MiB reads, and ASCII-only reads in between.
    head = b"a" * ((1 << 20) - 5)  # "東" starts 1 byte after the first read, then at, 1 and 2 bytes before its end
    data = b"h1,h2\n" + head + "東,京\n".encode() + b"1,2\n" * 300_000 + "x,都\n".encode()
    path = tmp_path / "t.csv"
    for shift in range(4):
        path.write_bytes(data[shift:] if shift else data)
        assert packager.hash_csv(path) is not None


def test_a_set_cancel_event_stops_the_hash_first_pass(tmp_path: Path) -> None:
    import threading

    cancel = threading.Event()
    cancel.set()
    path = tmp_path / "t.csv"
    path.write_bytes("id,都道府県\n1,東京都\n".encode() * 1000)
    with pytest.raises(packager.Cancelled):
        packager.hash_csv(path, cancel=cancel)
    cancel.clear()
    assert packager.hash_csv(path, cancel=cancel) is not None
