"""checks: real files in tmp_path, real zips, and the csv module as the oracle for the byte-level fast path."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import random
import re
import shutil
import socket
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrain_uploader.checks import (
    HINT_EMPTY,
    HINT_NOT_CSV,
    HINT_RESAVE_UTF8,
    CsvReport,
    InputError,
    _fast_rows,
    check_csv,
    check_csv_stream,
    check_same_header,
    open_regular,
)
from retrain_uploader.encodings import likely_misread
from retrain_uploader.zipcheck import check_zip

SMALL_CHUNKS = [1, 7, 64, 1 << 20]


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    def make(data: bytes | str, name: str = "data.csv", encoding: str = "utf-8") -> Path:
        path = tmp_path / name
        path.write_bytes(data.encode(encoding) if isinstance(data, str) else data)
        return path

    return make


def table(rows: int, cols: int = 4, *, term: str = "\n") -> str:
    header = ",".join(f"col{i}" for i in range(cols))
    body = "".join(",".join(f"v{r}_{c}" for c in range(cols)) + term for r in range(rows))
    return header + term + body


# -- what a good file reports ----------------------------------------------------------------------------------


def test_utf8_report(write: Callable[..., Path]) -> None:
    data = "id,名前,price\n1,りんご,100\n2,みかん,80\n".encode()
    report = check_csv(write(data))
    assert report == CsvReport(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), encoding="utf-8",
                               delimiter=",", columns=3, header=("id", "名前", "price"), rows=2)


def test_utf8_with_bom(write: Callable[..., Path]) -> None:
    data = "\ufeff商品,数量\r\nりんご,3\r\n".encode()
    report = check_csv(write(data))
    assert (report.encoding, report.header, report.rows) == ("utf-8-sig", ("商品", "数量"), 1)
    assert report.sha256 == hashlib.sha256(data).hexdigest()  # of the bytes as they are, BOM included


@pytest.mark.parametrize("chunk_size", SMALL_CHUNKS)
def test_shift_jis(write: Callable[..., Path], chunk_size: int) -> None:
    text = "店舗,売上,備考\r\n" + "".join(f"東京{i},{i * 100},ソ表能\r\n" for i in range(50))
    data = text.encode("cp932")
    report = check_csv(write(data), chunk_size=chunk_size)
    assert (report.encoding, report.header, report.rows) == ("cp932", ("店舗", "売上", "備考"), 50)
    assert (report.size_bytes, report.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_tab_separated_and_the_delimiter_rule(write: Callable[..., Path]) -> None:
    tsv = check_csv(write("a\tb\tc\n1\t2\t3\n"))
    assert (tsv.delimiter, tsv.columns) == ("\t", 3)
    both = check_csv(write("a,b\tc\n1,2\t3\n"))  # commas win when the header has both
    assert (both.delimiter, both.header) == (",", ("a", "b\tc"))


@pytest.mark.parametrize("chunk_size", SMALL_CHUNKS)
@pytest.mark.parametrize("term", ["\n", "\r\n"])
def test_quoted_fields_with_delimiters_newlines_and_quotes(
    write: Callable[..., Path], chunk_size: int, term: str
) -> None:
    rows = [["1", "a, b", 'say "hi"'], ["2", f"line1{term}line2", ""], ["3", "", "x"]] * 20
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator=term).writerows([["id", "text", "note"], *rows])
    report = check_csv(write(buf.getvalue()), chunk_size=chunk_size)
    assert (report.columns, report.rows) == (3, 60)


def test_quoted_header_and_quote_all(write: Callable[..., Path]) -> None:
    buf = io.StringIO(newline="")
    csv.writer(buf, quoting=csv.QUOTE_ALL).writerows([["id", "a,b"], ["1", "x"], ["2", "y\nz"]])
    assert check_csv(write(buf.getvalue())).header == ("id", "a,b")


def test_last_row_without_newline_and_trailing_empty_lines(write: Callable[..., Path]) -> None:
    assert check_csv(write("a,b\n1,2\n3,4")).rows == 2
    assert check_csv(write("a,b\r\n1,2\r\n\r\n\r\n")).rows == 1
    assert check_csv(write("only\n1\n2\n\n")).rows == 2  # one column: an empty line is still not a row


def test_sink_gets_every_byte_once_in_order(write: Callable[..., Path]) -> None:
    for data in (table(300).encode(), ("ヘッダ,列\n" + "値,1\n" * 300).encode("cp932")):
        got: list[bytes] = []
        check_csv(write(data), sink=got.append, chunk_size=100)
        assert b"".join(got) == data
        assert all(len(chunk) <= 100 for chunk in got)


def test_non_utf8_needs_a_seekable_stream() -> None:
    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return False

    with pytest.raises(io.UnsupportedOperation, match=r"seekable"):
        check_csv_stream(Pipe("a,b\nア,1\n".encode("cp932")), name="pipe")


# -- what a bad file says ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", SMALL_CHUNKS)
def test_ragged_row_names_the_row(write: Callable[..., Path], chunk_size: int) -> None:
    lines = table(40).splitlines()
    lines[16] = "x,y,z"  # row 17, counting the header as row 1
    with pytest.raises(InputError) as e:
        check_csv(write("\n".join(lines) + "\n"), chunk_size=chunk_size)
    assert "data.csv: row 17 has 3 columns, the header has 4;" in str(e.value)


def test_ragged_row_deep_in_a_large_file(write: Callable[..., Path]) -> None:
    lines = table(200_000).splitlines()
    lines[150_000] += ",extra"
    with pytest.raises(InputError, match=r"row 150001 has 5 columns, the header has 4"):
        check_csv(write("\n".join(lines) + "\n"), chunk_size=4096)


def test_ragged_row_after_a_multiline_field_gives_the_line_too(write: Callable[..., Path]) -> None:
    expected = r"row 3 \(ending on line 4\) has 1 column, the header has 2; check for missing or extra commas"
    with pytest.raises(InputError, match=expected):
        check_csv(write('a,b\n1,"two\nlines"\nlonely\n'))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "data.csv: the file is empty"),
        (b"\xef\xbb\xbf", "there is no header row"),
        (b"a,b,c\n", "has a header row but no data rows"),
        (b"a,b,c", "has a header row but no data rows"),
        (b"a,b,c\r\n\r\n\r\n", "has a header row but no data rows"),
        (b"\na,b\n1,2\n", "row 1 is empty; the first row must be the header"),
        (b" , \n1,2\n", "row 1 is empty; the first row must be the header"),
        (b"a,b\n1,2\n\n3,4\n", "row 3 is empty but data rows follow it"),
        (b'a,b\n1,"x"y\n', r"row 2: ',' expected after '\"'"),
        (b'a,b\n1,2\n3,"open\n', "row 3: unexpected end of data"),
        (b"a,b\n1,\x002\n", "contains a NUL byte"),
        (b"a,b\n\x81\x20,1\n", "neither UTF-8 .* nor Shift_JIS/cp932"),
    ],
)
def test_bad_files(write: Callable[..., Path], data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        check_csv(write(data))


def test_utf16_is_binary(write: Callable[..., Path]) -> None:
    with pytest.raises(InputError, match=r"NUL byte .* UTF-16"):
        check_csv(write("a,b\n1,2\n", encoding="utf-16"))


def test_random_bytes_are_rejected(write: Callable[..., Path]) -> None:
    rnd = random.Random(7)
    noise = bytes(rnd.randrange(256) for _ in range(64 << 10))
    with pytest.raises(InputError, match=r"NUL byte"):
        check_csv(write(noise))
    with pytest.raises(InputError):
        check_csv(write(noise.replace(b"\0", b"")))


def test_invalid_encoding_says_where(write: Callable[..., Path]) -> None:
    data = b"a,b\n" + "いろは,1\n".encode("cp932") + b"x,\x81\x20\n"  # \x81 needs a trail byte
    with pytest.raises(InputError) as e:
        check_csv(write(data))
    message = str(e.value)
    assert "neither UTF-8 (invalid at line 2, byte offset 4)" in message
    assert f"nor Shift_JIS/cp932 (invalid at line 3, byte offset {len(data) - 3})" in message
    assert "CSV UTF-8" in message


@pytest.mark.parametrize("chunk_size", [100, 1 << 20])
def test_overlong_line(write: Callable[..., Path], chunk_size: int) -> None:
    with pytest.raises(InputError, match=r"line 3 is longer than 1000 bytes"):
        check_csv(write("a,b\n1,2\n" + "x" * 5000), chunk_size=chunk_size, max_line_bytes=1000)


def test_messages_never_quote_data_rows(write: Callable[..., Path]) -> None:
    with pytest.raises(InputError) as e:
        check_csv(write("name,secret\nalice,hunter2,extra\n"))
    assert "hunter2" not in str(e.value)
    assert "alice" not in str(e.value)


def test_header_mismatch() -> None:
    def report(*header: str) -> CsvReport:
        return CsvReport(1, "0" * 64, "utf-8", ",", len(header), header, 1)

    check_same_header(report("a", "b"), report("a", "b"), train_name="t.csv", eval_name="e.csv")
    with pytest.raises(InputError, match=r"column 2 is 'B' in e.csv but 'b' in t.csv; the evaluation data"):
        check_same_header(report("a", "b"), report("a", "B"), train_name="t.csv", eval_name="e.csv")
    with pytest.raises(InputError, match=r"e.csv has 3 columns but t.csv has 2"):
        check_same_header(report("a", "b"), report("a", "b", "c"), train_name="t.csv", eval_name="e.csv")
    with pytest.raises(InputError) as e:
        check_same_header(report("a" * 500), report("b" * 500), train_name="t.csv", eval_name="e.csv")
    assert len(str(e.value)) < 300  # a short excerpt, not the whole cell


# -- opening files safely ---------------------------------------------------------------------------------------


def test_symlink_is_not_followed(write: Callable[..., Path], tmp_path: Path) -> None:
    target = write(table(2))
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    with pytest.raises(InputError, match=r"link.csv: is a symbolic link"):
        check_csv(link)


@pytest.mark.timeout(5)
def test_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"pipe.csv: not a regular file \(a FIFO\)"):
        check_csv(fifo)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(InputError, match=r"not a regular file \(a directory\)"):
        open_regular(tmp_path / "dir.csv")


def test_socket_and_device_are_not_files(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock.csv"))
        with pytest.raises(InputError, match=r"sock.csv: not a regular file \(a socket\)"):
            open_regular(tmp_path / "sock.csv")
    with pytest.raises(InputError, match=r"null: not a regular file \(a device or special file\)"):
        open_regular(Path("/dev/null"))


def test_missing_file_propagates_unchanged(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_csv(tmp_path / "gone.csv")


@pytest.fixture
def unreadable_file() -> Iterator[Path]:
    # Outside tmp_path: pytest's base folder is root-only, and the check must fail on the file itself.
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        path = folder / "secret.csv"
        path.write_text(table(1))
        path.chmod(0o000)
        yield path
    finally:
        shutil.rmtree(folder)


def test_unreadable_file(unreadable_file: Path) -> None:
    if os.geteuid() != 0:
        with pytest.raises(InputError, match=r"permission denied"):
            open_regular(unreadable_file)
        return
    # Root reads anything; drop the effective uid to nobody for this one open (the real uid stays root).
    try:
        os.seteuid(65534)
    except PermissionError:
        pytest.skip("running as root without the right to change the effective uid")
    try:
        with pytest.raises(InputError, match=r"secret.csv: permission denied; make the file readable"):
            open_regular(unreadable_file)
    finally:
        os.seteuid(0)


# -- the fast path against the csv module ------------------------------------------------------------------------


def reference(data: bytes) -> tuple[str, str, tuple[str, ...], int] | None:
    """The rules, applied the slow obvious way with the csv module; None where a file must be refused."""
    if b"\0" in data:
        return None
    for encoding in ("utf-8-sig", "cp932"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        break
    else:
        return None
    if encoding == "cp932" and likely_misread(data) is not None:
        return None  # cp1252, Latin-1 or EUC-JP that happens to decode as cp932
    first = io.StringIO(text, newline="").readline()
    delimiter = "\t" if "\t" in first and "," not in first else ","
    # The other delimiter wins when it alone gives the first 21 physical lines one width of 2 or more.
    lines = "\n".join(re.split(r"\r\n|\r|\n", text.removesuffix("\r\n").removesuffix("\n").removesuffix("\r"))[:21])
    other = "," if delimiter == "\t" else "\t"
    widths = {len(r) for r in csv.reader(io.StringIO(lines), delimiter=other) if r}
    mine = {len(r) for r in csv.reader(io.StringIO(lines), delimiter=delimiter) if r}
    lines_n = lines.count("\n") + 1
    if lines_n > 1 and len(widths) == 1 and min(widths) >= 2 and not (len(mine) == 1 and min(mine) >= 2):
        delimiter = other
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error:
        return None
    if not rows or not any(cell.strip() for cell in rows[0]):
        return None
    header, body = rows[0], rows[1:]
    while body and not body[-1]:
        body.pop()
    if not body or any(len(row) != len(header) for row in body):
        return None
    if encoding == "utf-8-sig":
        encoding = "utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8"
    return encoding, delimiter, tuple(header), len(body)


def outcome(data: bytes, chunk_size: int) -> tuple[str, str, tuple[str, ...], int] | None:
    try:
        r = check_csv_stream(io.BytesIO(data), name="t.csv", chunk_size=chunk_size)
    except InputError:
        return None
    assert (r.size_bytes, r.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert r.columns == len(r.header)
    return r.encoding, r.delimiter, r.header, r.rows


tokens = st.sampled_from([b"a", b"b1", b",", b"\t", b'"', b'""', b"\n", b"\r\n", b"\r", b" ", "あ".encode(),
                          "あ".encode("cp932"), b"\x81", b"\xef\xbb\xbf",
                          # whole quoted values, so longer files reach the fast path's quoted regions
                          b'"a,b"', b'"x\ny"', b'"q""r"', b'"\r\n,"'])
chunks = st.sampled_from([1, 2, 3, 5, 16, 1 << 20])


@settings(max_examples=1500, deadline=None)
@given(st.lists(tokens, max_size=40).map(b"".join), chunks)
def test_any_bytes_are_judged_like_the_csv_module(data: bytes, chunk_size: int) -> None:
    assert outcome(data, chunk_size) == reference(data)


@pytest.mark.parametrize("chunk_size", [1, 16, 1 << 20])
def test_a_second_bom_is_data_not_a_hint_for_the_separator(chunk_size: int) -> None:
    # Found by the property test above: the sniffer dropped the second BOM as if it were the first, saw a blank
    # header line and chose tab from a row of one tab.
    assert outcome(b"\xef\xbb\xbf\xef\xbb\xbf\n\t", chunk_size) == reference(b"\xef\xbb\xbf\xef\xbb\xbf\n\t")


cells = st.text(alphabet=st.sampled_from(list('ab1 ,"\n\r\tあ日本語ｱ')), max_size=6)


@settings(max_examples=400, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda n: st.tuples(
            st.lists(cells, min_size=n, max_size=n).filter(lambda h: any(c.strip() for c in h)),
            st.lists(st.lists(cells, min_size=n, max_size=n), min_size=1, max_size=30),
        )
    ),
    st.sampled_from(["utf-8", "utf-8-sig", "cp932"]),
    st.sampled_from(["\n", "\r\n"]),
    st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
    st.sampled_from([",", "\t"]),
    chunks,
)
def test_written_tables_round_trip(
    header_rows: tuple[list[str], list[list[str]]], encoding: str, term: str, quoting: Literal[0, 1], delimiter: str,
    chunk_size: int,
) -> None:
    header, rows = header_rows
    buf = io.StringIO(newline="")
    csv.writer(buf, delimiter=delimiter, lineterminator=term, quoting=quoting).writerows([header, *rows])
    data = buf.getvalue().encode(encoding)
    got = outcome(data, chunk_size)
    text = io.StringIO(buf.getvalue(), newline="")
    first_line = text.readline()
    misleading = delimiter != ("\t" if "\t" in first_line and "," not in first_line else ",")
    text.seek(0)
    if misleading or list(csv.reader(text, delimiter=delimiter)) != [header, *rows]:
        # The first line points at the other delimiter, or csv.writer left a CR unquoted: judged like csv.
        assert got == reference(data)
        return
    if encoding == "cp932" and data.isascii():
        encoding = "utf-8"  # plain ASCII is reported as UTF-8
    assert got == (encoding, delimiter, tuple(header), len(rows))


# -- zips ----------------------------------------------------------------------------------------------------------


def make_zip(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


TRAIN = table(5).encode()
EVAL = table(2).encode()


def test_zip_train_and_eval(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", {"train_src/": b"", "eval_src/": b"", "train_src/a.csv": TRAIN,
                                         "eval_src/b.csv": EVAL})
    report = check_zip(path)
    assert (report.train_member, report.eval_member) == ("train_src/a.csv", "eval_src/b.csv")
    assert (report.train.rows, report.train.sha256) == (5, hashlib.sha256(TRAIN).hexdigest())
    assert report.eval is not None
    assert report.eval.rows == 2
    assert report.size_bytes == path.stat().st_size
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_zip_train_only_and_cp932_member(tmp_path: Path) -> None:
    data = "列,値\n" .encode("cp932") + "あ,1\n".encode("cp932")
    report = check_zip(make_zip(tmp_path / "m.zip", {"train_src/a.csv": data}))
    assert (report.eval_member, report.eval, report.train.encoding) == (None, None, "cp932")


def test_zip_member_named_in_cp932_without_the_utf8_flag(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", {"train_src/XX.csv": TRAIN})
    # Patch the name bytes as old Japanese Windows writes them: cp932, no UTF-8 flag. "表" ends in 0x5C ("\").
    path.write_bytes(path.read_bytes().replace(b"train_src/XX.csv", "train_src/表.csv".encode("cp932")))
    assert check_zip(path).train_member == "train_src/表.csv"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"train_src/../a.csv": TRAIN}, "unsafe path"),
        ({"/train_src/a.csv": TRAIN}, "unsafe path"),
        ({"train_src\\a.csv": TRAIN}, "unsafe path"),
        ({"train_src/a.csv": TRAIN, "readme.txt": b"hi"}, "unexpected entry 'readme.txt'"),
        ({"train_src/a.csv": TRAIN, "train_src/notes.txt": b"x"}, "unexpected entry 'train_src/notes.txt'"),
        ({"train_src/a.csv": TRAIN, "train_src/b.csv": TRAIN}, "more than one CSV in train_src/"),
        ({"eval_src/a.csv": EVAL}, "no train_src/<file>.csv entry"),
        ({"data/a.csv": TRAIN}, "unexpected entry 'data/a.csv'"),
        ({"a.csv": TRAIN}, "unexpected entry 'a.csv'"),
        ({"m/train_src/a.csv": TRAIN}, "unexpected entry 'm/train_src/a.csv'"),
        ({"train_src/sub/a.csv": TRAIN}, "unexpected entry"),
        ({}, "no train_src/<file>.csv entry"),
        ({"train_src/a.csv": TRAIN, "eval_src/b.csv": table(2, cols=3).encode()}, "eval_src/b.csv has 3 columns"),
        ({"train_src/a.csv": b"a,b\n1,2,3\n"}, "m.zip:train_src/a.csv: row 2 has 3 columns"),
    ],
)
def test_zip_layouts_refused(tmp_path: Path, entries: dict[str, bytes], message: str) -> None:
    with pytest.raises(InputError, match=message):
        check_zip(make_zip(tmp_path / "m.zip", entries))


def test_zip_bomb_and_size_limit(tmp_path: Path) -> None:
    bomb = make_zip(tmp_path / "bomb.zip", {"train_src/a.csv": b"a,b\n" + b"0" * (50 << 20)})
    assert bomb.stat().st_size < (50 << 20) / 200
    with pytest.raises(InputError, match=r"expands .* times \(limit 200\), refused as a possible zip bomb"):
        check_zip(bomb)
    ok = make_zip(tmp_path / "ok.zip", {"train_src/a.csv": TRAIN})
    with pytest.raises(InputError, match=f"expand to {len(TRAIN)} bytes, more than the limit of 50"):
        check_zip(ok, max_uncompressed_bytes=50)
    with pytest.raises(InputError, match=r"zip bomb"):
        check_zip(ok, max_ratio=1.0)


def test_corrupt_zips(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK not really a zip")
    with pytest.raises(InputError, match=r"junk.zip: not a valid zip file"):
        check_zip(junk)
    good = make_zip(tmp_path / "stored.zip", {"train_src/a.csv": TRAIN}, zipfile.ZIP_STORED).read_bytes()
    crc = tmp_path / "crc.zip"
    crc.write_bytes(good.replace(b"v3_3", b"v3_4"))  # same length, wrong CRC
    with pytest.raises(InputError, match=r"Bad CRC-32"):
        check_zip(crc)
    truncated = tmp_path / "cut.zip"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match=r"not a valid zip file"):
        check_zip(truncated)
    deflated = bytearray(make_zip(tmp_path / "d.zip", {"train_src/a.csv": TRAIN * 50}).read_bytes())
    deflated[60:70] = b"\xff" * 10  # garbage in the compressed stream
    broken = tmp_path / "broken.zip"
    broken.write_bytes(bytes(deflated))
    with pytest.raises(InputError, match=r"not a valid zip file, or corrupt"):
        check_zip(broken)


def test_zip_symlink_is_not_followed(tmp_path: Path) -> None:
    target = make_zip(tmp_path / "real.zip", {"train_src/a.csv": TRAIN})
    (tmp_path / "link.zip").symlink_to(target)
    with pytest.raises(InputError, match=r"symbolic link"):
        check_zip(tmp_path / "link.zip")


def test_errno_of_other_os_errors_is_kept(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        open_regular(tmp_path / "missing" / "x.csv")
    assert e.value.errno == errno.ENOENT
    assert not isinstance(e.value, InputError)


def test_a_bare_cr_inside_a_crlf_row_is_judged_like_the_csv_module() -> None:
    # Found by hypothesis on a fresh clone: the byte-level fast path counted the stray CR as the row's terminator.
    data = b",1\r\n,\r1\n"
    assert outcome(data, 1 << 20) == reference(data) is None


@pytest.mark.parametrize(("region", "rows"), [
    (b'1,"a,b",2\n', 1),  # a delimiter inside quotes
    (b'1,"a\nb",2\n3,"",4\n', 2),  # a quoted line break, an empty quoted value
    (b'"1","a""b""",""""\n', 1),  # doubled quotes: adjacent segments, one value
    (b'1,"a",2\r\n3,"b\r\nc",4\r\n', 2),
    (b'1,"a,2\n', None),  # a quote never closed
    (b'1,a"b",2\n', None),  # a quote inside an unquoted value (the csv module takes it as data)
    (b'1,"a"b,2\n', None),  # text after the closing quote
    (b'1,"a" ,2\n', None),
    (b'1,"a,b,2\n3,"c",4\n', None),  # odd quoting: pairing the quotes puts the line break inside a value
    (b'1,"a,b",2,3\n', None),  # a delimiter too many outside quotes
])
def test_the_quoted_fast_path_counts_rows_or_leaves_the_region_to_the_csv_module(region: bytes,
                                                                                  rows: int | None) -> None:
    term = b"\r\n" if region.endswith(b"\r\n") else b"\n"
    assert _fast_rows(region, b",," + term) == rows
    data = b"h1,h2,h3" + term + region
    assert outcome(data, 1 << 20) == reference(data)
    if rows is not None:
        assert reference(data) == ("utf-8", ",", ("h1", "h2", "h3"), rows)


def test_a_tab_separated_file_with_a_comma_in_a_column_name_is_read_as_tsv(write: Callable[..., Path]) -> None:
    data = b"State\tMurder (per 100,000)\tAssault\nAlabama\t13.2\t236\nAlaska\t10\t263\n"
    report = check_csv(write(data))
    assert (report.delimiter, report.header, report.rows) == ("\t", ("State", "Murder (per 100,000)", "Assault"), 2)


def test_a_semicolon_export_with_decimal_commas_is_named(write: Callable[..., Path]) -> None:
    data = b"name;price;weight\nA;1,5;2,25\nB;3,75;1,5\n"
    with pytest.raises(InputError, match=r"separated by semicolons"):
        check_csv(write(data))


@pytest.mark.parametrize("data", [
    b"name;price;weight\nA;1,5;2,25\nB;3,75;1,5\n",  # comma splits the rows unevenly
    b"x;y;z\r\n1;2;a\r\n3,5;4;b\r\n5;6;c\r\n",  # one decimal comma, CRLF
    b"x;y\r1.234,5;a\r2.000,25;b\r",  # thousands separators, CR-only
    '\ufeffname;rate (per 100,000)\nÅ;1,5\nB;2,25\n'.encode(),  # comma gives 2 even columns too: a name, one decimal
    "気温;時間 (per 1,000)\n1,5;朝\n3,5;夜\n".encode("cp932"),
], ids=["uneven", "crlf", "cr-thousands", "header-comma", "cp932-header-comma"])
def test_a_semicolon_export_is_named_whatever_its_decimal_commas(data: bytes) -> None:
    with pytest.raises(InputError, match=r"separated by semicolons") as caught:
        check_csv_stream(io.BytesIO(data), name="eu.csv")
    assert caught.value.hint is not None and 'field delimiter ","' in caught.value.hint


def test_a_comma_csv_whose_values_hold_semicolons_is_still_comma_separated() -> None:
    report = check_csv_stream(io.BytesIO(b"a,b;c\n1,x;y\n2,p;q\n"), name="f.csv")
    assert (report.delimiter, report.header) == (",", ("a", "b;c"))


# -- line numbers as an editor shows them, and the real cause named (issue 10) -----------------------------------

EOLS = pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])


def refusal(data: bytes, chunk_size: int = 1 << 20, **kwargs: int) -> InputError:
    with pytest.raises(InputError) as caught:
        check_csv_stream(io.BytesIO(data), name="f.csv", chunk_size=chunk_size, **kwargs)
    return caught.value


@EOLS
@pytest.mark.parametrize("chunk_size", SMALL_CHUNKS)
def test_an_undecodable_byte_is_on_the_line_an_editor_shows(eol: bytes, chunk_size: int) -> None:
    data = eol.join([b"a,b", b"1,2", b"3,4", b"5,\x81\x7f", b"6,7"]) + eol  # 81 7F: neither UTF-8 nor cp932
    error = refusal(data, chunk_size)
    assert re.findall(r"invalid at line (\d+)", str(error)) == ["4", "4"]
    assert error.hint == HINT_RESAVE_UTF8


@EOLS
@pytest.mark.parametrize("chunk_size", [1, 7, 16])  # the screen works per chunk: lines longer than a chunk
def test_a_line_too_long_is_numbered_as_an_editor_does(eol: bytes, chunk_size: int) -> None:
    data = eol.join([b"a,b", b"1,2", b"x" * 100, b"3,4"]) + eol
    error = refusal(data, chunk_size, max_line_bytes=50)
    assert str(error) == ("f.csv: line 3 is longer than 50 bytes; this is not a usable CSV (binary data, or line "
                          "breaks missing)")
    assert error.hint == HINT_NOT_CSV


@EOLS
def test_a_ragged_row_after_a_quoted_line_break_names_its_row_and_line(eol: bytes) -> None:
    data = eol.join([b"a,b", b'1,"two', b'lines"', b"3,4", b"5"]) + eol
    error = refusal(data)
    assert str(error).startswith("f.csv: row 4 (ending on line 5) has 1 column, the header has 2")
    assert error.hint is not None and error.hint.startswith("Fix row 4 of the file (it has 1 value, the header has 2")


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("chunk_size", SMALL_CHUNKS)
@pytest.mark.parametrize("bad", [b"5,x\ry", b"x\ry,5"], ids=["last-value", "first-value"])
def test_a_lone_cr_inside_an_unquoted_value_is_named_with_its_row_and_line(eol: bytes, chunk_size: int,
                                                                          bad: bytes) -> None:
    data = eol.join([b"a,b", b'1,"two\nlines"', b"3,4", bad, b"6,7"]) + eol
    error = refusal(data, chunk_size)
    assert str(error) == (
        "f.csv: row 4 (line 5) holds a carriage return (CR, \\r) alone inside an unquoted value, which ends the row "
        "there, so the rest of the line is read as another row; remove the CR, or put the value in double quotes")
    assert error.hint == ("Fix row 4 of the file (line 5: remove the carriage return (CR) inside a value, or put that "
                          "value in double quotes), save it, and drop it into the inbox again.")


def test_a_lone_cr_inside_quotes_is_data_and_a_ragged_row_beside_it_is_not_blamed_on_it() -> None:
    report = check_csv_stream(io.BytesIO(b'a,b\n1,"x\ry"\n2,3\n'), name="f.csv")
    assert report.rows == 2
    error = refusal(b'a,b\n1,"x\ry",9\n')
    assert str(error).startswith("f.csv: row 2 has 3 columns, the header has 2")


@pytest.mark.parametrize(("data", "hint"), [
    (b"", HINT_EMPTY),
    (b"a,b\n", HINT_EMPTY),
    (b"a,b\r\n\r\n", HINT_EMPTY),
    (b"a,b\n1,\0\n", HINT_NOT_CSV),
    ("name,city\nA,Curaçao\nB,Don\u2019t know\n".encode("cp1252"), HINT_RESAVE_UTF8),
    (b"a,b\n1,2\n3,4,5\n", "Fix row 3 of the file (it has 3 values, the header has 2: a missing or extra comma, or "
                           "a value holding a comma without double quotes), save it, and drop it into the inbox "
                           "again."),
    (b'a,b\n1,2\n3,"x"y\n', "Fix row 3 of the file (double the quotes inside a quoted value, and put a value that "
                            "holds a comma, a quote or a line break in double quotes), save it, and drop it into the "
                            "inbox again."),
    (b"a,b\n1,2\n\n3,4\n", "Fix row 3 of the file (remove the empty rows between row 2 and row 4), save it, and drop "
                           "it into the inbox again."),
], ids=["empty", "header-only", "header-and-blank", "binary", "cp1252", "ragged", "quoting", "blank-row"])
def test_each_refusal_says_what_to_do_about_it(data: bytes, hint: str) -> None:
    for chunk_size in (3, 1 << 20):
        assert refusal(data, chunk_size).hint == hint


def test_a_quote_never_closed_may_be_a_file_cut_while_copied_and_says_so() -> None:
    error = refusal(b'a,b\n1,2\n3,"unfinished\n')
    assert error.hint is not None and error.hint.startswith("Fix row 3 of the file")
    assert "copy it under a .part name" in error.hint


def test_a_zip_with_the_wrong_layout_says_the_expected_layout(tmp_path: Path) -> None:
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/train.csv", "a,b\n1,2\n")
    with pytest.raises(InputError, match=r"unexpected entry 'data/train\.csv'") as caught:
        check_zip(path)
    assert caught.value.hint is not None
    assert "train_src/<training>.csv and, optionally, eval_src/<evaluation>.csv" in caught.value.hint
