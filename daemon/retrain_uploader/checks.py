"""Input checks run before anything is uploaded: safe open, CSV shape and encoding, zip layout.

Everything here is synchronous and meant for a worker thread. A CSV is read once, in chunks: each raw chunk
updates the sha256, goes to an optional sink and is checked, so memory stays flat whatever the size. Rows are
checked on raw bytes where that is provably what the csv module would conclude (about twice as fast), and by
the csv module itself from the first region where it is not; both give the same verdicts and messages.
"""

from __future__ import annotations

import codecs
import csv
import errno
import functools
import hashlib
import io
import itertools
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from .encodings import SAMPLE_BYTES, likely_encoding, likely_misread
from .rules import RuleError, Rules, TargetStats

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["CsvReport", "InputError", "check_csv", "check_csv_stream", "check_same_header", "excerpt",
           "open_regular"]

MAX_LINE_BYTES = 8 << 20
# The byte-level fast path has no field size limit; let the csv module (the slow path) accept what it does.
# Process-wide, but only ever raised here, and lines are bounded by MAX_LINE_BYTES anyway.
csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))


class InputError(ValueError):
    """The input cannot be uploaded as it is; the message says what is wrong, where, and what to do."""


@dataclass(frozen=True, slots=True)
class CsvReport:
    size_bytes: int
    sha256: str
    encoding: str  # "utf-8" | "utf-8-sig" | "cp932"
    delimiter: str
    columns: int
    header: tuple[str, ...]
    rows: int  # data rows, header and trailing empty lines not counted
    warnings: tuple[str, ...] = ()  # from the model's rules: the file passes, but someone should know
    target: TargetStats | None = None  # what the target column held, when the model names one


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading without following a symlink or blocking on a FIFO; require a regular file.

    Only the last path component is protected from symlinks (``O_NOFOLLOW``). Raises InputError for a symlink,
    a non-regular file or a permission problem; any other OSError (missing file, EIO...) propagates unchanged.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError as e:
        msg = f"{path}: permission denied; make the file readable by the user the daemon runs as"
        raise InputError(msg) from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            msg = f"{path}: is a symbolic link, which is never followed; drop the file itself instead"
            raise InputError(msg) from e
        if e.errno == errno.ENXIO:  # a unix socket
            msg = f"{path}: not a regular file (a socket); drop a regular file"
            raise InputError(msg) from e
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            msg = f"{path}: not a regular file ({_kind(mode)}); drop a regular file"
            raise InputError(msg)
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    kinds = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
    return kinds.get(stat.S_IFMT(mode), "a device or special file")


_NON_ASCII_LINE = re.compile(rb"[^\n]*[\x80-\xff][^\n]*\n")


class _Undecodable(Exception):
    def __init__(self, offset: int, line: int) -> None:
        super().__init__(offset, line)
        self.where = f"line {line}, byte offset {offset}"


class _Tap(io.RawIOBase):
    """Raw reader in front of the parsers: hashes, feeds the sink, screens and validates every chunk once."""

    def __init__(self, raw: IO[bytes], *, name: str, encoding: str, chunk_size: int, max_line: int,
                 update: Callable[[bytes], None] | None, sink: Callable[[bytes], object] | None) -> None:
        super().__init__()
        self._raw, self.name, self.encoding, self.chunk_size = raw, name, encoding, chunk_size
        self.max_line, self._update, self._sink = max_line, update, sink
        self._decoder: codecs.IncrementalDecoder | None = codecs.getincrementaldecoder(encoding)()
        self.size = self.lines = self._run = 0
        self.head = b""  # the first bytes, to tell a BOM
        self._pushback = b""
        # Lines holding non-ASCII bytes, to judge whether a file that decodes as cp932 really is cp932.
        self.sample: bytearray | None = bytearray() if encoding == "cp932" else None
        self._carry = b""
        self.rules = Rules()
        self.target_index: int | None = None
        self.stats = TargetStats()

    def begin(self, header: tuple[str, ...]) -> None:
        """The header is known: find the model's target column (raises InputError if it is missing)."""
        try:
            self.target_index = self.rules.start(header)
        except RuleError as e:
            raise InputError(f"{self.name}: {e}") from None
        self.stats = TargetStats()

    def feed(self, values: list[str]) -> None:
        self.rules.feed(self.stats, values)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer)
        if self._pushback:  # already screened and counted
            data, self._pushback = self._pushback[: len(view)], self._pushback[len(view):]
        else:
            data = self.take(len(view))
        view[: len(data)] = data
        return len(data)

    def unread(self, data: bytes) -> None:
        self._pushback = data

    def drain(self) -> None:
        """Read the rest without decoding, so the hash and sink still see every byte."""
        self._decoder = None
        while self.take():
            pass

    def take(self, n: int = 0) -> bytes:
        data = self._raw.read(n or self.chunk_size)
        if self._update is not None:
            self._screen(data)
            self._update(data)
            if self._sink is not None and data:
                self._sink(data)
        start, lines = self.size, self.lines
        if self.sample is not None and len(self.sample) < SAMPLE_BYTES:
            self._collect(data)
        self.size += len(data)
        self.lines += data.count(b"\n")
        if len(self.head) < len(codecs.BOM_UTF8):
            self.head += data[: len(codecs.BOM_UTF8) - len(self.head)]
        pending = 0 if self._decoder is None else len(self._decoder.getstate()[0])
        if self._decoder is not None and (pending or not data.isascii()):
            try:
                # Validating here, before any parsing, gives the exact position of a bad byte.
                self._decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                self._decoder = None
                at = e.start - pending  # e.start counts from the bytes held back from the previous chunk
                raise _Undecodable(start + at, lines + data.count(b"\n", 0, max(at, 0)) + 1) from e
        return data

    def _collect(self, data: bytes) -> None:
        assert self.sample is not None
        pending = self._carry + data
        cut = len(pending) if not data else pending.rfind(b"\n") + 1
        whole, self._carry = pending[:cut], pending[cut:][-65536:]
        if not whole.isascii():
            self.sample += b"".join(_NON_ASCII_LINE.findall(whole + (b"" if data else b"\n")))

    def _screen(self, data: bytes) -> None:
        nul = data.find(b"\0")
        if nul >= 0:
            msg = (f"{self.name}: contains a NUL byte (byte offset {self.size + nul}), so it is binary "
                   "data, not CSV text, e.g. UTF-16 \"Unicode text\"; save it as UTF-8 CSV")
            raise InputError(msg)
        # Bounds what a parser must hold for one line (to within one chunk).
        brk = max(data.rfind(b"\n"), data.rfind(b"\r"))
        self._run = self._run + len(data) if brk < 0 else len(data) - brk - 1
        if self._run > self.max_line:
            line = self.lines + data.count(b"\n") + 1
            msg = (f"{self.name}: line {line} is longer than {self.max_line} bytes; "
                   "this is not a usable CSV (binary data, or line breaks missing)")
            raise InputError(msg)


def check_csv_stream(raw: IO[bytes], *, name: str, sink: Callable[[bytes], object] | None = None,
                     chunk_size: int = 1 << 20, max_line_bytes: int = MAX_LINE_BYTES,
                     rules: Rules | None = None, hashed: bool = True) -> CsvReport:
    """Check the CSV read from ``raw`` (from its current position to EOF) and hash it in the same pass.

    Checks: not empty, no NUL bytes, no line longer than about ``max_line_bytes``, UTF-8 (BOM allowed) or
    else Shift_JIS/cp932 (unless the cp932 reading looks like a cp1252, Latin-1 or EUC-JP file read wrongly), a
    header row, at least one data row, as many columns on every row as in the header (empty lines are allowed
    only after the last data row), well-formed quoting (csv strict mode). The delimiter is the one of comma and
    tab that makes the header and the first rows agree (a ";"-separated export is refused, naming it). With
    ``rules``, the model's target/task/columns rules run in the same pass (warnings land in the report).
    Raises InputError naming ``name`` and the row (rows counted like a spreadsheet: the header is row 1).

    ``sink`` receives every raw chunk exactly once, in order, during the first pass. A file that is not
    UTF-8 is still read to its end in that pass (hash and sink stay complete); then ``raw`` is seeked back
    and parsed again as cp932 without calling ``sink``. So sink never needs a reset, but ``raw`` must be
    seekable for non-UTF-8 input (io.UnsupportedOperation otherwise).

    ``hashed=False`` skips the sha256 (the report's is then ""): for bytes whose digest the caller computes anyway
    (a PUT's body, checked as it is sent).
    """
    start = raw.tell() if raw.seekable() else None
    hasher = hashlib.sha256()
    rules = rules or Rules()
    tap = _Tap(raw, name=name, encoding="utf-8", chunk_size=chunk_size, max_line=max_line_bytes,
               update=hasher.update if hashed else _skip, sink=sink)
    tap.rules = rules
    try:
        delimiter, header, rows = _scan(tap)
        encoding = "utf-8-sig" if tap.head == codecs.BOM_UTF8 else "utf-8"
        done = tap
    except _Undecodable as utf8_error:
        tap.drain()
        if start is None:
            msg = f"{name}: not UTF-8, and re-reading it as cp932 needs a seekable stream"
            raise io.UnsupportedOperation(msg) from utf8_error
        raw.seek(start)
        replay = _Tap(raw, name=name, encoding="cp932", chunk_size=chunk_size, max_line=max_line_bytes,
                      update=None, sink=None)
        replay.rules = rules
        try:
            delimiter, header, rows = _scan(replay)
        except _Undecodable as cp932_error:
            assert replay.sample is not None
            guess = likely_encoding(bytes(replay.sample))
            named = f"; it looks like {guess}" if guess else ""
            msg = (f"{name}: the text is neither UTF-8 (invalid at {utf8_error.where}) nor Shift_JIS/cp932 "
                   f"(invalid at {cp932_error.where}){named}; {RESAVE}")
            raise InputError(msg) from cp932_error
        assert replay.sample is not None
        misread = likely_misread(bytes(replay.sample))
        if misread is not None:
            msg = (f"{name}: the text is not UTF-8, and read as Shift_JIS/cp932 it is garbled: it looks like "
                   f"{misread}; {RESAVE}")
            raise InputError(msg) from utf8_error
        encoding = "cp932"
        done = replay
    try:
        warnings = rules.compare_header(header) + rules.verdict(done.stats)
    except RuleError as e:
        raise InputError(f"{name}: {e}") from None
    return CsvReport(size_bytes=tap.size, sha256=hasher.hexdigest() if hashed else "", encoding=encoding,
                     delimiter=delimiter, columns=len(header), header=header, rows=rows, warnings=tuple(warnings),
                     target=done.stats if rules.target is not None else None)


def _skip(_data: bytes) -> None:
    """Stands in for the hash when the caller hashes the bytes itself (the screening still runs)."""


RESAVE = ("open it in Excel (or a text editor) and save it as \"CSV UTF-8 (comma delimited)\", then drop it again")


_Shape = tuple[str, tuple[str, ...], int]


def _scan(tap: _Tap) -> _Shape:
    """Byte-level fast path; any region it cannot vouch for goes, with the rest, to the csv module.

    Delimiters, quotes and line breaks are ASCII and never part of a UTF-8 or cp932 multibyte character,
    so rows can be checked on raw bytes: cut the buffer at the last line break outside quotes (quote
    parity), blank out quoted fields, require every quote to sit at a field boundary, and require the
    remaining delimiters and line breaks to be the header's pattern repeated, one per row.
    """
    buf = tap.take()
    while not (end := _first_row_end(buf)) and len(buf) <= tap.max_line and (more := tap.take()):
        buf += more
    bom = len(codecs.BOM_UTF8) if tap.encoding == "utf-8" and buf.startswith(codecs.BOM_UTF8) else 0
    lines, eof = buf.count(b"\n"), False
    while lines < _SNIFF_LINES and len(buf) < _SNIFF_BYTES and not eof:  # the first rows too, whatever chunk_size
        more = tap.take()
        buf, lines, eof = buf + more, lines + more.count(b"\n"), not more
    delimiter = _sniff(buf[bom:], tap, complete=eof)
    known = _fast_header(buf[bom:end], tap.encoding, delimiter) if end else None
    if known is None:
        return _slow(tap, buf, None, 2, 0, delimiter)
    delimiter, header, term = known
    tap.begin(header)
    pattern = delimiter.encode() * (len(header) - 1) + term
    rows, buf, eof = 0, buf[end:], False
    while not eof:
        chunk = tap.take()
        buf += chunk
        eof = not chunk
        cut = len(buf) if eof else _last_row_end(buf)
        if not cut and len(buf) <= tap.max_line:
            continue  # no complete row yet
        region = buf[:cut] + (term if eof and buf and not buf.endswith(b"\n") else b"")
        n = _fast_rows(region, pattern) if cut else None
        if n is None:
            return _slow(tap, buf, (delimiter, header), rows + 2, tap.lines - buf.count(b"\n"), delimiter)
        if tap.target_index is not None and n:
            if b'"' in region:
                tap.feed(_column(region, delimiter, tap.target_index, tap.encoding))
            else:
                tap.rules.feed_raw(tap.stats, _column_pattern(delimiter, tap.target_index).findall(region),
                                   tap.encoding)
        rows, buf = rows + n, buf[cut:]
    if rows == 0:
        raise InputError(f"{tap.name}: has a header row but no data rows; add the data below the header")
    return delimiter, header, rows


def _first_row_end(buf: bytes) -> int:
    i, prev, quotes = buf.find(b"\n"), 0, 0
    while i >= 0:
        quotes += buf.count(b'"', prev, i)
        if quotes % 2 == 0:
            return i + 1
        prev, i = i, buf.find(b"\n", i + 1)
    return 0


def _last_row_end(buf: bytes) -> int:
    i = buf.rfind(b"\n")
    if i < 0 or b'"' not in buf:
        return i + 1
    total, after = buf.count(b'"'), buf.count(b'"', i)
    while (total - after) % 2:  # this line break is inside a quoted field
        j = buf.rfind(b"\n", 0, i)
        if j < 0:
            return 0
        after, i = after + buf.count(b'"', j, i), j
    return i + 1


_SNIFF_LINES, _SNIFF_BYTES = 21, 1 << 16


def _sniff(buf: bytes, tap: _Tap, *, complete: bool) -> str:
    """Comma or tab: the one that gives the header and the first rows one width of at least 2 columns.

    A tab-separated file may have a comma in a column name ("Murder (per 100,000)"): the first line alone would
    say comma. When neither agrees the old rule stands (tab if the first line has tabs and no commas), so the
    shape check reports the ragged row. A file only ";" makes consistent is a European-locale export: refused.
    """
    window = buf[:_SNIFF_BYTES]
    lines = window.splitlines()
    if not (complete and len(window) == len(buf)) and not window.endswith((b"\n", b"\r")):
        lines = lines[:-1]  # the last one is cut by the window
    lines = lines[:_SNIFF_LINES]
    first = lines[0] if lines else b""
    default = "\t" if b"\t" in first and b"," not in first else ","
    text = b"\n".join(lines).decode(tap.encoding, errors="replace").removeprefix("\ufeff")
    consistent = []
    for candidate in (default, "\t" if default == "," else ",", ";"):
        widths = {len(r) for r in csv.reader(io.StringIO(text), delimiter=candidate) if r}
        if len(widths) == 1 and widths.pop() >= 2 and len(lines) > 1:
            consistent.append(candidate)
    if consistent == [";"]:
        msg = (f"{tap.name}: the values are separated by semicolons (\";\"), as a European-locale Excel saves "
               "\"CSV\" (decimal commas); Prediction One reads comma- or tab-separated files: save it as "
               "\"CSV UTF-8 (comma delimited)\" or as tab-separated text and drop it again")
        raise InputError(msg)
    return consistent[0] if consistent else default


@functools.cache
def _column_pattern(delimiter: str, index: int) -> re.Pattern[bytes]:
    d = re.escape(delimiter.encode())
    other = rb"[^" + d + rb"\r\n]*+"
    # One match per row, each starting where the last ended (rows are whole and checked): no scan for line starts.
    return re.compile(rb"(?:" + other + d + rb"){" + str(index).encode() + rb"}(" + other + rb")[^\r\n]*+\r?\n")


def _column(region: bytes, delimiter: str, index: int, encoding: str) -> list[str]:
    """The ``index``-th value of every row of a quoted region of whole rows (already checked by _fast_rows)."""
    # Quoted values may hold delimiters and line breaks: let csv split them. (Unquoted regions go to feed_raw.)
    text = io.StringIO(region.decode(encoding), newline="")
    return [row[index] for row in csv.reader(text, delimiter=delimiter, strict=True) if row]


def _fast_header(row: bytes, encoding: str, delimiter: str) -> tuple[str, tuple[str, ...], bytes] | None:
    try:
        cells = list(csv.reader(io.StringIO(row.decode(encoding), newline=""), delimiter=delimiter, strict=True))
    except csv.Error:
        return None
    if len(cells) != 1 or len(cells[0]) < 2 or not any(c.strip() for c in cells[0]):
        return None  # leave odd headers (and one-column files, where an empty line is a valid row) to _slow
    term = b"\r\n" if row.endswith(b"\r\n") else b"\n"
    if _fast_rows(row, delimiter.encode() * (len(cells[0]) - 1) + term) != 1:
        return None
    return delimiter, tuple(cells[0]), term


@functools.cache
def _tools(delimiter: int) -> tuple[re.Pattern[bytes], bytes]:
    d = re.escape(bytes([delimiter]))
    # A blanked-out quoted field (NUL) touching anything but a delimiter, a line break or another one.
    misplaced = re.compile(rb"\0(?:(?<=[^\0\n\r" + d + rb"]\0)|[^\0\n\r" + d + rb"])")
    noise = bytes(b for b in range(256) if b not in (delimiter, 10, 13))
    return misplaced, noise


def _fast_rows(region: bytes, pattern: bytes) -> int | None:
    """Rows in ``region`` if it is whole rows exactly like ``pattern``, else None (let csv decide)."""
    misplaced, noise = _tools(pattern[0])
    if b'"' in region:
        parts = region.split(b'"')
        if len(parts) % 2 == 0:
            return None
        region = b"\0".join(parts[::2])
        if misplaced.search(region):
            return None
    if pattern.endswith(b"\r\n") and region.count(b"\r") != region.count(b"\r\n"):
        return None  # a bare CR outside quotes ends a row for csv; the skeleton below would blur its position
    skeleton = region.translate(None, noise)
    n = skeleton.count(b"\n")
    return n if len(skeleton) == n * len(pattern) and skeleton.count(pattern) == n else None


def _slow(tap: _Tap, pushback: bytes, known: tuple[str, tuple[str, ...]] | None, row0: int, line0: int,
          delimiter: str) -> _Shape:
    """Parse with the csv module from a row boundary to EOF; exact error messages come from here."""
    tap.unread(pushback)
    encoding = "utf-8-sig" if tap.encoding == "utf-8" and known is None else tap.encoding
    text = io.TextIOWrapper(io.BufferedReader(tap, tap.chunk_size), encoding=encoding, newline="")
    if known is None:
        first = text.readline()
        if not first:
            what = "the file is empty" if tap.size == 0 else "there is no header row"
            raise InputError(f"{tap.name}: {what}; drop a CSV with a header row and at least one data row")
        reader = csv.reader(itertools.chain((first,), text), delimiter=delimiter, strict=True)
    else:
        delimiter, header = known
        reader = csv.reader(text, delimiter=delimiter, strict=True)
    n = 0 if known is None else row0 - 1
    try:
        if known is None:
            header = tuple(next(reader))
            if not any(cell.strip() for cell in header):
                msg = f"{tap.name}: row 1 is empty; the first row must be the header (the column names)"
                raise InputError(msg)
            n = row0 - 1
            tap.begin(header)
        index, batch = tap.target_index, []
        for n, row in enumerate(reader, row0):
            if len(row) != len(header):
                if row:
                    raise InputError(_ragged(tap.name, n, line0 + reader.line_num, len(row), len(header), delimiter))
                _only_blank_lines_left(reader, tap.name, n)
                rows = n - 2
                break
            if index is not None:
                batch.append(row[index])
                if len(batch) >= 4096:
                    tap.feed(batch)
                    batch = []
        else:
            rows = n - 1
        if batch:
            tap.feed(batch)
    except csv.Error as e:
        msg = (f"{tap.name}: row {n + 1}: {e}; a value holding {_delimiter_name(delimiter)}s, quotes or line "
               "breaks must be in double quotes, with each inner quote doubled (\"\")")
        raise InputError(msg) from e
    if rows == 0:
        raise InputError(f"{tap.name}: has a header row but no data rows; add the data below the header")
    return delimiter, header, rows


def _only_blank_lines_left(reader: Iterator[list[str]], name: str, blank: int) -> None:
    for n, row in enumerate(reader, blank + 1):
        if row:
            msg = f"{name}: row {blank} is empty but data rows follow it (row {n}); remove the empty lines"
            raise InputError(msg)


def _ragged(name: str, n: int, line: int, got: int, cols: int, delimiter: str) -> str:
    where = f"row {n}" if line == n else f"row {n} (ending on line {line})"
    d = _delimiter_name(delimiter)
    return (f"{name}: {where} has {got} column{'s' * (got != 1)}, the header has {cols}; check for missing or "
            f"extra {d}s, and put values that contain a {d} in double quotes")


def _delimiter_name(delimiter: str) -> str:
    return "tab" if delimiter == "\t" else "comma"


def check_csv(path: Path, *, name: str | None = None, sink: Callable[[bytes], object] | None = None,
              chunk_size: int = 1 << 20, max_line_bytes: int = MAX_LINE_BYTES, rules: Rules | None = None) -> CsvReport:
    """Open ``path`` with open_regular and run check_csv_stream on it (``name`` defaults to the file name)."""
    with open_regular(path) as raw:
        return check_csv_stream(raw, name=name or path.name, sink=sink, chunk_size=chunk_size,
                                max_line_bytes=max_line_bytes, rules=rules)


def check_same_header(train: CsvReport, eval_: CsvReport, *, train_name: str, eval_name: str) -> None:
    """Raise InputError unless the evaluation CSV has exactly the training CSV's header."""
    if train.header == eval_.header:
        return
    fix = "the evaluation data must have the same columns, in the same order, as the training data"
    if train.columns != eval_.columns:
        msg = f"{eval_name} has {eval_.columns} columns but {train_name} has {train.columns}; {fix}"
        raise InputError(msg)
    i = next(i for i, (a, b) in enumerate(zip(train.header, eval_.header, strict=True)) if a != b)
    msg = (f"{eval_name} and {train_name} have different headers: column {i + 1} is "
           f"{excerpt(eval_.header[i])} in {eval_name} but {excerpt(train.header[i])} in {train_name}; "
           f"{fix}")
    raise InputError(msg)


def excerpt(cell: str, limit: int = 40) -> str:
    """A short, quoted excerpt of a value for an error message (never whole file contents)."""
    return repr(cell if len(cell) <= limit else cell[:limit] + "…")
