"""Structured log events: one line each, a dotted name plus fields.

Formats: ``journal`` (key=value with a syslog priority prefix that
journald turns into the entry's level), ``json`` (one object a line) and
``console`` (for people at a terminal). ``auto`` picks the journal when
stderr is connected to it, the console on a terminal, JSON otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "critical": 2,
}
_REDACTED = "[redacted: key material]"


def is_journal(stream: TextIO) -> bool:
    """Say whether ``stream`` is the journal, per ``$JOURNAL_STREAM``."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def choose_format(requested: str, stream: TextIO) -> str:
    """Resolve ``auto`` to the format that suits ``stream``."""
    if requested != "auto":
        return requested
    if is_journal(stream):
        return "journal"
    if stream.isatty():
        return "console"
    return "json"


def configure(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None
) -> str:
    """Set up structlog for the process; return the format chosen."""
    stream = stream or sys.stderr
    chosen = choose_format(fmt, stream)

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _redact_keys,
    ]
    if chosen == "journal":
        processors.extend(
            [structlog.processors.format_exc_info, _render_journal]
        )
    elif chosen == "console":
        processors.extend(
            [
                structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                structlog.processors.format_exc_info,
                structlog.dev.ConsoleRenderer(colors=stream.isatty()),
            ]
        )
    else:
        processors.extend(
            [
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ]
        )

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return chosen


def _redact_keys(
    logger: WrappedLogger, method: str, event: EventDict
) -> EventDict:
    """Replace any value that carries private key material.

    Nothing logs keys on purpose; this stops an accident, such as an
    error message quoting a file's contents, from reaching the journal.
    """
    del logger, method
    for name, value in event.items():
        if "PRIVATE KEY" in str(value):
            event[name] = _REDACTED
    return event


def _render_journal(
    logger: WrappedLogger, method: str, event: EventDict
) -> str:
    """Render ``<6>event key=value ...`` for journald's stream parser."""
    del logger, method
    level = event.pop("level", "info")
    name = event.pop("event", "")
    parts = [f"<{_PRIORITY.get(level, 6)}>{name}"]
    parts.extend(f"{key}={_quote(value)}" for key, value in event.items())
    return " ".join(parts)


def _quote(value: Any) -> str:  # noqa: ANN401 - any field value
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in " \"'=\\\n\t"):
        return text
    return json.dumps(text, ensure_ascii=False)
