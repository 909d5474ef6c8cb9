"""Logging set-up, called only by the CLI: structlog, one JSON object per line on stderr (console form on a tty),
and optionally the same JSON lines in a file that logrotate may move away (it is reopened)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import structlog

from .redact import structlog_processor

__all__ = ["configure"]


class _ReopeningFile:
    """Appends lines to ``path``; when the file was moved or deleted (logrotate), opens a new one."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open()

    def _open(self) -> TextIO:
        f = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 -- kept open for the life of the process
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


class _Logger:
    """A structlog logger writing each rendered line to stderr and, if set, a file."""

    def __init__(self, stream: TextIO, file: _ReopeningFile | None) -> None:
        self._stream = stream
        self._file = file

    def msg(self, message: str) -> None:
        print(message, file=self._stream, flush=True)
        if self._file is not None:
            self._file.write_line(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def configure(
    *, level: str = "info", json_lines: bool | None = None, stream: TextIO | None = None, file: Path | None = None
) -> None:
    """Route structlog (and stdlib logging from libraries) to ``stream`` (stderr) and optionally ``file``.

    ``json_lines=None`` picks JSON unless the stream is a terminal (a file always gets JSON). Every value passes
    the secret scrubber last.
    """
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = file is not None or not stream.isatty()
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False) if json_lines else structlog.dev.ConsoleRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_lines:
        processors.append(structlog.processors.format_exc_info)
    processors += [structlog_processor, renderer]
    sink = _Logger(stream, _ReopeningFile(file) if file is not None else None)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stream, format="%(levelname)s %(name)s %(message)s")
