"""Logging set-up, called only by the CLI: structlog, one JSON object per line on stderr (console form on a tty;
native journal records with PRIORITY and fields when stderr is the journal, see journal.py), and optionally the same
JSON lines in a file that logrotate may move away (it is reopened).

Every line that reaches stderr or the file takes one path: our own events, stdlib ``logging`` records (aiohttp,
asyncio), warnings, uncaught exceptions of the process, of threads and of asyncio tasks (with :func:`run_main`) are
rendered by the same processors and renderer, and the rendered line passes the secret scrubber last.

A file name that is not valid UTF-8 reaches us as a str with lone surrogates (``os.fsdecode``: byte 0xff becomes
U+DCFF). Such a code point is written as the JSON escape ``\\udcff``, so a line never fails to encode, stays valid
JSON, and ``json.loads`` gives back the very str (``os.fsencode`` of it, the original bytes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Coroutine, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar

import structlog

from .clock import iso_utc
from .journal import JournalSender, journal_fields, stderr_is_journal
from .redact import scrub, scrub_values

__all__ = ["configure", "escape_surrogates", "run_main"]

T = TypeVar("T")

_SURROGATE = re.compile("[\ud800-\udfff]")
_HANDLER_NAME = "retrain_uploader"


def escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate written as ``\\udcXX``: encodable as UTF-8, and a valid JSON escape."""
    if text.isascii():  # most lines (a flag of the string, not a scan): no surrogate in them
        return text
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class _ReopeningFile:
    """Appends lines to ``path``; when the file was moved or deleted (logrotate), opens a new one."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open()

    def _open(self) -> TextIO:
        # backslashreplace: a line is escaped before it gets here; this only guards against a future caller.
        f = open(self._path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 -- kept open for the life of the process
        self._ident = os.fstat(f.fileno())[1:3]
        return f

    def write_line(self, line: str) -> None:
        with self._lock:
            try:
                st = os.stat(self._path)
                moved = (st.st_ino, st.st_dev) != self._ident
            except FileNotFoundError:
                moved = True
            if moved:
                self._file.close()
                self._file = self._open()
            self._file.write(line + "\n")
            self._file.flush()


class _Sink:
    """Where every rendered line goes: scrubbed, surrogates escaped, to stderr (or, when stderr is the journal, to the
    journal with its fields) and, if set, the file."""

    def __init__(self, stream: TextIO, file: _ReopeningFile | None, journal: JournalSender | None = None) -> None:
        self._stream = stream
        self._file = file
        self._journal = journal

    def write(self, line: str) -> None:
        line = escape_surrogates(scrub(line))
        if self._file is not None:
            self._file.write_line(line)
        if self._journal is not None and self._journal.send(journal_fields(line)):
            return
        try:
            print(line, file=self._stream, flush=True)
        except UnicodeEncodeError:  # a stream that cannot take the text as it is (an ASCII terminal)
            encoding = getattr(self._stream, "encoding", None) or "ascii"
            print(line.encode(encoding, "backslashreplace").decode(encoding), file=self._stream, flush=True)


class _Logger:
    """The structlog logger of one name: hands each rendered line to the shared sink."""

    def __init__(self, sink: _Sink, name: str | None) -> None:
        self._sink = sink
        self.name = name

    def msg(self, message: str) -> None:
        self._sink.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _Handler(logging.Handler):
    """The stdlib root handler: formats records with structlog's ProcessorFormatter into the same sink."""

    def __init__(self, sink: _Sink, formatter: logging.Formatter, level: int) -> None:
        super().__init__(level)
        self.set_name(_HANDLER_NAME)
        self.setFormatter(formatter)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception as e:  # a bad record (wrong %-args) must not cost the line, nor raise in the caller
            line = _fallback_line(record, e)
        self._sink.write(line)


def _fallback_line(record: logging.LogRecord, error: Exception) -> str:
    fields = {
        "event": "logging.record_unformattable",
        "level": "error",
        "logger": record.name,
        "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
        "msg": repr(record.msg),
        "error": f"{type(error).__name__}: {error}",
    }
    return json.dumps(fields, ensure_ascii=False, default=repr)


def _add_logger_name(logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    name = record.name if record is not None else getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


def _add_timestamp(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``timestamp``: now, in UTC, to the microsecond (``2026-12-08T02:12:46.282624Z``)."""
    event_dict["timestamp"] = iso_utc(time.time())
    return event_dict


def _json_default(value: Any) -> Any:
    """A value JSON has no form for: its ``__structlog__()`` if it has one, else its repr (as structlog renders)."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


# One encoder for every line (json.dumps with arguments builds a new one per call).
_encode_line = json.JSONEncoder(ensure_ascii=False, default=_json_default).encode


def _render_json(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    """The line: the event's fields as one JSON object, non-ASCII text as it is."""
    return _encode_line(event_dict)


def configure(
    *, level: str = "info", json_lines: bool | None = None, stream: TextIO | None = None, file: Path | None = None
) -> None:
    """Route structlog, stdlib logging, warnings and uncaught exceptions to ``stream`` (stderr) and optionally ``file``.

    ``json_lines=None`` picks JSON unless the stream is a terminal (a file always gets JSON). Every line passes
    the secret scrubber last. Stdlib records below WARNING are dropped unless ``level`` is debug.
    """
    stream = stream or sys.stderr
    journal = JournalSender() if stderr_is_journal(stream) else None
    if json_lines is None:
        json_lines = journal is not None or file is not None or not stream.isatty()
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = _render_json if json_lines else structlog.dev.ConsoleRenderer()
    # No merge_contextvars: nothing here binds structlog context variables, and it walked every context variable of
    # the task (asyncio's, aiohttp's) for each line.
    shared: list[Any] = [structlog.stdlib.add_log_level, _add_logger_name, _add_timestamp]
    # Exceptions are rendered to text in the line, in both forms. Each string value is scrubbed before rendering AND
    # the sink scrubs the whole rendered line (nested values included): rendering escapes quotes, backslashes and tabs
    # once more, and a secret in a value so escaped no longer matches the line's patterns (found by review when the
    # per-value pass was dropped: an escaped JSON fragment, a password holding `"`, a tab after `token:`).
    last: list[Any] = [structlog.processors.format_exc_info, scrub_values, renderer]
    sink = _Sink(stream, _ReopeningFile(file) if file is not None else None, journal)
    structlog.configure(
        processors=shared + last,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _Logger(sink, args[0] if args and isinstance(args[0], str) else None),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared, processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last]
    )
    stdlib_level = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)  # ours from an earlier call (the CLI calls again once it has read the config)
    root.addHandler(_Handler(sink, formatter, stdlib_level))
    root.setLevel(stdlib_level)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught


def _log_uncaught(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, tb)
        return
    structlog.get_logger("retrain_uploader").critical("process.uncaught_exception", exc_info=(kind, error, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    structlog.get_logger("retrain_uploader").error(
        "thread.uncaught_exception",
        thread=args.thread.name if args.thread is not None else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _log_loop_exception(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: an exception no task awaited, as one scrubbed JSON event."""
    fields: dict[str, Any] = {}
    for key, value in context.items():
        if key in ("message", "exception"):
            continue
        if key.endswith("traceback") and isinstance(value, list):
            fields[key] = "".join(traceback.format_list(value))
        else:
            fields[key] = value if isinstance(value, str | int | float | bool) or value is None else repr(value)
    error = context.get("exception")
    structlog.get_logger("asyncio").error(
        "asyncio.unhandled_exception",
        message=context.get("message"),
        exc_info=error if isinstance(error, BaseException) else None,
        **fields,
    )


async def _with_loop_handler(main: Coroutine[Any, Any, T]) -> T:
    asyncio.get_running_loop().set_exception_handler(_log_loop_exception)
    return await main


def run_main(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` with the loop's unhandled exceptions (a task's, a callback's) logged as JSON events."""
    return asyncio.run(_with_loop_handler(main))
