"""Structured logs (`LOG_FORMAT=json`) that say which task a line is about.

A context variable holds the fields of what the process is doing now (on a Celery worker: the
task id, its scheduler and attempt while `tasks.run_task` runs, and the Celery task's own name
and id for every job); a logging filter copies them onto each record, and the JSON formatter
(python-json-logger) writes every record as one JSON object a line: `time`, `level`,
`logger`, `message`, those fields, and anything a caller passed with `extra=`. One task can
then be followed across machines with one query on `task_id` in the log store.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from scheduler_site import tracing

_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "scheduler_log_fields", default=None
)


def bind(**fields: Any) -> contextvars.Token[dict[str, Any] | None]:
    """Add fields to every record logged from here on in this context; undo with unbind()."""
    return _fields.set({**current(), **fields})


def unbind(token: contextvars.Token[dict[str, Any] | None]) -> None:
    _fields.reset(token)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def current() -> dict[str, Any]:
    return dict(_fields.get() or {})


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (a field the caller set itself wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # With tracing on, also the current span's trace_id and span_id: a log line leads to
        # its trace, and a trace to its lines.
        for name, value in (current() | tracing.log_fields()).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def json_formatter() -> JsonFormatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def use_json(logger: logging.Logger) -> None:
    """Give a logger's handlers (e.g. the ones Celery sets up for its worker) the JSON format
    and the context fields."""
    for handler in logger.handlers:
        handler.setFormatter(json_formatter())
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
