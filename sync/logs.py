"""Logging set-up: `key=value` text lines or one JSON object per line (`SYNC_LOG_FORMAT`).

Each event carries its fields as `extra`: a stable `action` and, where they apply, `audience`,
`audience_id`, `destination`, `destination_id`, `outcome`, the counts and `reason`. Both formats render
every field; a library's record (APScheduler, alembic) has its logger's name as its action.
"""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Protocol

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The event's fields: its `action` first, then the other extras that hold a value."""
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}
    return {"action": extra.pop("action", record.name), **extra}


class _Audience(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...


def audience_fields(audience: _Audience) -> dict[str, Any]:
    """The fields naming an audience in an event."""
    return {"audience": audience.name, "audience_id": audience.id}


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _logfmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\\') or not text.isprintable():
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """`time LEVEL message key=value ...`, a traceback on the lines after."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={_logfmt(v)}" for k, v in _fields(record).items())
        line = f"{_time(record)} {record.levelname} {record.getMessage()} {pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # their INFO lines repeat what our own events say (a job added, run, executed); warnings still show
    for noisy in ("httpx", "alembic.runtime.migration", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
