"""Logging set-up, called only by the CLI: structlog, one JSON object per line on stderr (console form on a tty)."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from .redact import structlog_processor

__all__ = ["configure"]


def configure(*, level: str = "info", json_lines: bool | None = None, stream: TextIO | None = None) -> None:
    """Route structlog (and stdlib logging from libraries) to ``stream`` (stderr).

    ``json_lines=None`` picks JSON unless the stream is a terminal. Every value passes the secret scrubber last.
    """
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = not stream.isatty()
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
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stream, format="%(levelname)s %(name)s %(message)s")
