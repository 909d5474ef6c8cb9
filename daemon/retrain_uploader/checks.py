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

__all__ = ["HINT_EMPTY", "HINT_NOT_CSV", "HINT_RESAVE_UTF8", "CsvReport", "InputError", "check_csv",
           "check_csv_stream", "check_same_header", "excerpt", "fix_row_hint", "open_regular"]

MAX_LINE_BYTES = 8 << 20
# The byte-level fast path has no field size limit; let the csv module (the slow path) accept what it does.
# Process-wide, but only ever raised here, and lines are bounded by MAX_LINE_BYTES anyway.
csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))


class InputError(ValueError):
    """The input cannot be uploaded as it is; the message says what is wrong and where.

    ``hint`` is what the user should do about this failure (the error file's ``what_to_do``), or None when the
    caller's general advice fits (e.g. a file cut short while being copied).
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


HINT_RESAVE_UTF8 = (
    "Re-save the file as UTF-8 CSV and drop it again: in Excel, File > Save As > \"CSV UTF-8 (comma delimited) "
    "(*.csv)\"; in LibreOffice Calc, File > Save As > \"Text CSV\", tick \"Edit filter settings\" and choose "
    "the character set \"Unicode (UTF-8)\"; in Numbers, File > Export To > CSV with text encoding \"Unicode "
    "(UTF-8)\"."
)
HINT_NOT_CSV = (
    "This is not a CSV text file (for example an .xlsx workbook renamed to .csv, UTF-16 \"Unicode Text\", or "
    "another binary file). Open it in its application, save it as \"CSV UTF-8 (comma delimited)\" and drop "
    "that file."
)
HINT_EMPTY = (
    "The export is empty: it holds no data rows. Check the query, filter or sheet the export was made from, "
    "export again with the data rows below the header row, and drop the new file."
)
HINT_SEMICOLON = (
    "Export it again comma-separated, with \".\" as the decimal mark (Prediction One reads \"1,5\" as text, "
    "not a number): in LibreOffice Calc, File > Save As > \"Text CSV\" with field delimiter \",\"; Excel "
    "uses the Windows list separator and decimal symbol (Settings > Region > Additional settings: list "
    "separator \",\", decimal symbol \".\"). Then drop the new file."
)


def fix_row_hint(row: int, what: str) -> str:
    """The ``what_to_do`` for a problem in one row of a CSV."""
    return f"Fix row {row} of the file ({what}), save it, and drop it into the inbox again."


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
        raise InputError(msg, hint="Make the file readable by the user the daemon runs as, then drop it again.") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            msg = f"{path}: is a symbolic link, which is never followed; drop the file itself instead"
            hint = "Drop the file itself (copied or moved into the inbox), not a link to it."
            raise InputError(msg, hint=hint) from e
        if e.errno == errno.ENXIO:  # a unix socket
            msg = f"{path}: not a regular file (a socket); drop a regular file"
            raise InputError(msg, hint=_HINT_REGULAR) from e
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            msg = f"{path}: not a regular file ({_kind(mode)}); drop a regular file"
            raise InputError(msg, hint=_HINT_REGULAR)
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


_HINT_REGULAR = "Drop a regular file (a CSV or a zip), not a folder, FIFO, socket or device."


def _kind(mode: int) -> str:
    kinds = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
    return kinds.get(stat.S_IFMT(mode), "a device or special file")


_NON_ASCII_LINE = re.compile(rb"[^\n]*[\x80-\xff][^\n]*\n")


def _line_end(data: bytes) -> bytes | None:
    """The line break an editor would see in ``data``: b"\\r" for a CR-only (classic Mac) file, else b"\\n" (LF or
    CRLF); None when ``data`` holds none yet, or ends in a CR whose next byte decides."""
    cr, lf = data.find(b"\r"), data.find(b"\n")
    if cr < 0:
        return None if lf < 0 else b"\n"
    if 0 <= lf < cr or data[cr + 1 : cr + 2] == b"\n":
        return b"\n"
    return b"\r" if cr + 1 < len(data) else None


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
        self.size = self.lines = self._run = 0  # lines: line breaks so far, as an editor counts them (see eol)
        self.eol: bytes | None = None  # b"\n" (LF and CRLF files) or b"\r" (CR-only files), once seen
        self._eol_cr = False  # the last chunk ended in a CR that may be the first half of a CRLF
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
            raise InputError(f"{self.name}: {e}", hint=e.hint) from None
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

    def breaks(self, data: bytes, end: int | None = None) -> int:
        """Line breaks in ``data[:end]`` as an editor counts them."""
        return data.count(self.eol or b"\n", 0, len(data) if end is None else end)

    def _settle_eol(self, data: bytes) -> None:
        if self.eol is None and data:
            pending_cr = self._eol_cr
            self.eol = (b"\n" if data[:1] == b"\n" else b"\r") if pending_cr else _line_end(data)
            self._eol_cr = self.eol is None and data.endswith(b"\r")
            if pending_cr and self.eol == b"\r":
                self.lines += 1  # the previous chunk ended in the file's first line break, a CR

    def take(self, n: int = 0) -> bytes:
        data = self._raw.read(n or self.chunk_size)
        self._settle_eol(data)
        if self._update is not None:
            self._screen(data)
            self._update(data)
            if self._sink is not None and data:
                self._sink(data)
        start, lines = self.size, self.lines
        if self.sample is not None and len(self.sample) < SAMPLE_BYTES:
            self._collect(data)
        self.size += len(data)
        self.lines += self.breaks(data)
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
                raise _Undecodable(start + at, lines + self.breaks(data, max(at, 0)) + 1) from e
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
            raise InputError(msg, hint=HINT_NOT_CSV)
        # Bounds what a parser must hold for one line (to within one chunk).
        brk = max(data.rfind(b"\n"), data.rfind(b"\r"))
        self._run = self._run + len(data) if brk < 0 else len(data) - brk - 1
        if self._run > self.max_line:
            line = self.lines + self.breaks(data) + 1
            msg = (f"{self.name}: line {line} is longer than {self.max_line} bytes; "
                   "this is not a usable CSV (binary data, or line breaks missing)")
            raise InputError(msg, hint=HINT_NOT_CSV)


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
            raise InputError(msg, hint=HINT_RESAVE_UTF8) from cp932_error
        assert replay.sample is not None
        misread = likely_misread(bytes(replay.sample))
        if misread is not None:
            msg = (f"{name}: the text is not UTF-8, and read as Shift_JIS/cp932 it is garbled: it looks like "
                   f"{misread}; {RESAVE}")
            raise InputError(msg, hint=HINT_RESAVE_UTF8) from utf8_error
        encoding = "cp932"
        done = replay
    try:
        warnings = rules.compare_header(header) + rules.verdict(done.stats)
    except RuleError as e:
        raise InputError(f"{name}: {e}", hint=e.hint) from None
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
        # Most regions end at their last line break; only when that one sits inside a quoted value (the fast path
        # then finds a quote left over) is the cut looked for by quote parity, a pass over every quote.
        cut = len(buf) if eof else buf.rfind(b"\n") + 1
        region = buf[:cut] + (term if eof and buf and not buf.endswith(b"\n") else b"")
        n = _fast_rows(region, pattern) if cut else None
        if n is None and not eof and b'"' in buf:
            cut = _last_row_end(buf)
            region = buf[:cut]
            n = _fast_rows(region, pattern) if cut else None
        if not cut and len(buf) <= tap.max_line:
            continue  # no complete row yet
        if n is None:
            return _slow(tap, buf, (delimiter, header), rows + 2, tap.lines - tap.breaks(buf), delimiter)
        if tap.target_index is not None and n:
            if b'"' in region:
                tap.feed(_column(region, delimiter, tap.target_index, tap.encoding))
            else:
                tap.rules.feed_raw(tap.stats, _column_pattern(delimiter, tap.target_index).findall(region),
                                   tap.encoding)
        rows, buf = rows + n, buf[cut:]
    if rows == 0:
        raise InputError(f"{tap.name}: has a header row but no data rows; add the data below the header",
                         hint=HINT_EMPTY)
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
    shape check reports the ragged row. A file only ";" makes consistent is a European-locale export: refused; so is
    one that comma also makes consistent (one comma in a column name, one decimal comma per row) when its ";"
    values hold decimal-comma numbers ("1,5", "1.234,5").
    """
    window = buf[:_SNIFF_BYTES]
    lines = window.splitlines()
    if not (complete and len(window) == len(buf)) and not window.endswith((b"\n", b"\r")):
        lines = lines[:-1]  # the last one is cut by the window
    lines = lines[:_SNIFF_LINES]
    first = lines[0] if lines else b""
    default = "\t" if b"\t" in first and b"," not in first else ","
    # The caller cut the BOM off already: a second one is data (it is part of the first column name).
    encoding = "utf-8" if tap.encoding == "utf-8-sig" else tap.encoding
    text = b"\n".join(lines).decode(encoding, errors="replace")
    consistent = []
    for candidate in (default, "\t" if default == "," else ",", ";"):
        if candidate not in text:
            continue  # every row would be one column: never consistent (and a parse of the rows saved)
        widths = {len(r) for r in csv.reader(io.StringIO(text), delimiter=candidate) if r}
        if len(widths) == 1 and widths.pop() >= 2 and len(lines) > 1:
            consistent.append(candidate)
    if consistent[-1:] == [";"] and (len(consistent) == 1 or _decimal_commas(text)):
        msg = (f"{tap.name}: the values are separated by semicolons (\";\"), as a European-locale Excel saves "
               "\"CSV\" (decimal commas); Prediction One reads comma- or tab-separated files: save it as "
               "\"CSV UTF-8 (comma delimited)\" or as tab-separated text and drop it again")
        raise InputError(msg, hint=HINT_SEMICOLON)
    return consistent[0] if consistent else default


_DECIMAL_COMMA = re.compile(r"[+-]?(?:\d{1,3}(?:\.\d{3})+|\d+),\d+")


def _decimal_commas(text: str) -> bool:
    """Some value below the header, split at ";", is a number written with a decimal comma."""
    rows = csv.reader(io.StringIO(text), delimiter=";")
    next(rows, None)
    return any(_DECIMAL_COMMA.fullmatch(value.strip()) for row in rows for value in row)


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
        # Splitting on quotes pairs them as the csv module does (a regex removing each quoted segment costs more per
        # value, twice as much on an export quoting every field); every other part is outside quotes.
        parts = region.split(b'"')
        if len(parts) % 2 == 0:
            return None  # an odd quote count: a value never closed, or a region cut inside a quoted value
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
            raise InputError(f"{tap.name}: {what}; drop a CSV with a header row and at least one data row",
                             hint=HINT_EMPTY)
        lines = _EditorLines(itertools.chain((first,), text), tap, line0)
    else:
        delimiter, header = known
        lines = _EditorLines(text, tap, line0)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    n = 0 if known is None else row0 - 1
    try:
        if known is None:
            header = tuple(next(reader))
            if not any(cell.strip() for cell in header):
                msg = f"{tap.name}: row 1 is empty; the first row must be the header (the column names)"
                raise InputError(msg, hint=fix_row_hint(1, "the first row must hold the column names"))
            n = row0 - 1
            tap.begin(header)
        index, batch = tap.target_index, []
        for n, row in enumerate(reader, row0):
            if len(row) != len(header):
                if row:
                    raise _lone_cr(tap.name, n, row, lines) or _ragged(tap.name, n, lines.line, len(row),
                                                                        len(header), delimiter)
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
        where = f"row {n + 1}" + (f" (line {lines.line})" if lines.line != n + 1 else "")
        msg = (f"{tap.name}: {where}: {e}; a value holding {_delimiter_name(delimiter)}s, quotes or line "
               "breaks must be in double quotes, with each inner quote doubled (\"\")")
        hint = fix_row_hint(n + 1, "double the quotes inside a quoted value, and put a value that holds a "
                            f"{_delimiter_name(delimiter)}, a quote or a line break in double quotes")
        if "unexpected end of data" in str(e):  # a quote never closed, or the end of the file is missing
            hint = (f"{hint} If the file was still being copied when the daemon took it, copy it under a .part "
                    "name and rename it when complete, or raise [watch] settle_s.")
        raise InputError(msg, hint=hint) from e
    if rows == 0:
        raise InputError(f"{tap.name}: has a header row but no data rows; add the data below the header",
                         hint=HINT_EMPTY)
    return delimiter, header, rows


def _only_blank_lines_left(reader: Iterator[list[str]], name: str, blank: int) -> None:
    for n, row in enumerate(reader, blank + 1):
        if row:
            msg = f"{name}: row {blank} is empty but data rows follow it (row {n}); remove the empty lines"
            what = f"remove the empty rows between row {blank - 1} and row {n}"
            raise InputError(msg, hint=fix_row_hint(blank, what))


class _EditorLines:
    """The csv module's input lines, numbered as an editor numbers them.

    The csv module ends a line at CR, LF or CRLF alike; an editor showing a file whose lines end with LF or CRLF
    does not end one at a CR alone (it shows ^M). ``line`` is the editor line of the last line handed out.
    """

    __slots__ = ("_lines", "_open", "_tap", "line", "lone_cr", "pieces")

    def __init__(self, lines: Iterator[str], tap: _Tap, line0: int) -> None:
        self._lines, self._tap, self.line = lines, tap, line0
        self.pieces = 0  # lines handed out as the csv module counts them (its line_num)
        self.lone_cr: tuple[int, int] | None = None  # (pieces, line) when the last CR alone was handed out
        self._open = False  # the last piece ended in a CR alone: the editor line goes on

    def __iter__(self) -> _EditorLines:
        return self

    def __next__(self) -> str:
        piece = next(self._lines)
        self.pieces += 1
        if not self._open:
            self.line += 1
        self._open = piece[-1] == "\r" and self._tap.eol != b"\r"
        if self._open:
            self.lone_cr = (self.pieces, self.line)
        return piece


def _lone_cr(name: str, n: int, row: list[str], lines: _EditorLines) -> InputError | None:
    """Row ``n`` is ragged: an InputError naming the cause if a CR alone outside quotes split this row or the one
    before (the csv module ends a row there), else None."""
    if lines.lone_cr is None:
        return None
    piece, line = lines.lone_cr
    inner = sum(v.count("\n") + v.count("\r") - v.count("\r\n") for v in row)  # line breaks quoted in row n
    if piece == lines.pieces:
        split = n  # the CR ended row n: the rest of its line was read as row n + 1
    elif piece == lines.pieces - inner - 1:
        split = n - 1  # the CR ended row n - 1: row n is the rest of that line
    else:
        return None
    msg = (f"{name}: row {split} (line {line}) holds a carriage return (CR, \\r) alone inside an unquoted value, "
           "which ends the row there, so the rest of the line is read as another row; remove the CR, or put the "
           "value in double quotes")
    what = f"line {line}: remove the carriage return (CR) inside a value, or put that value in double quotes"
    return InputError(msg, hint=fix_row_hint(split, what))


def _ragged(name: str, n: int, line: int, got: int, cols: int, delimiter: str) -> InputError:
    where = f"row {n}" if line == n else f"row {n} (ending on line {line})"
    d = _delimiter_name(delimiter)
    msg = (f"{name}: {where} has {got} column{'s' * (got != 1)}, the header has {cols}; check for missing or "
           f"extra {d}s, and put values that contain a {d} in double quotes")
    what = f"it has {got} value{'s' * (got != 1)}, the header has {cols}: a missing or extra {d}, or a value " \
           f"holding a {d} without double quotes"
    return InputError(msg, hint=fix_row_hint(n, what))


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
    hint = (f"Give {eval_name} exactly the header row of {train_name} (the same column names in the same order), "
            "then drop both files again.")
    if train.columns != eval_.columns:
        msg = f"{eval_name} has {eval_.columns} columns but {train_name} has {train.columns}; {fix}"
        raise InputError(msg, hint=hint)
    i = next(i for i, (a, b) in enumerate(zip(train.header, eval_.header, strict=True)) if a != b)
    msg = (f"{eval_name} and {train_name} have different headers: column {i + 1} is "
           f"{excerpt(eval_.header[i])} in {eval_name} but {excerpt(train.header[i])} in {train_name}; "
           f"{fix}")
    raise InputError(msg, hint=hint)


def excerpt(cell: str, limit: int = 40) -> str:
    """A short, quoted excerpt of a value for an error message (never whole file contents)."""
    return repr(cell if len(cell) <= limit else cell[:limit] + "…")
