"""Optional OpenTelemetry traces: one trace follows a task from its push to its report.

Off by default. `SCHEDULER_OTEL=1` turns it on in each process that calls `setup()` (web:
wsgi.py; Celery worker, beat: scheduler_site.celery's signals; the pull runner: its
command); the standard `OTEL_*` variables configure it (README, "Tracing"). When off this
module imports nothing from OpenTelemetry, and every helper below is one test of a module
global: the hot paths (push, pop, claim, report) pay nothing else.

A task's work happens in several processes at different times (the push in a web process, the
dispatch on commit or later from beat's dispatcher, the run on a worker or a pull runner), so
the push's span context is stored with the task (`Task.trace_context`, a W3C traceparent) and
every later step continues the trace from there.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

SWITCH = "SCHEDULER_OTEL"
_TRUE = {"1", "true", "yes", "on"}

_otel: ModuleType | None = None  # scheduler_site.otel once set up in this process
_NOTHING = contextlib.nullcontext()  # reusable: what every span helper returns when off


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """The environment asks for traces: SCHEDULER_OTEL=1, and OpenTelemetry's own kill switch
    (OTEL_SDK_DISABLED=true) not set."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return environ.get(SWITCH, "").strip().lower() in _TRUE


def setup(role: str, *, exporter: Any = None) -> bool:
    """Start tracing in this process (once; later calls do nothing) when the environment asks
    for it, or with `exporter` (tests: an InMemorySpanExporter). `role` (web, worker, beat,
    runner) names the process in the default service name. True when tracing is on."""
    global _otel
    if _otel is not None:
        return True
    if exporter is None and not wanted():
        return False
    # Imported here, not at the top: with tracing off, no process loads OpenTelemetry at all.
    otel = importlib.import_module("scheduler_site.otel")
    otel.start(role, exporter=exporter)
    _otel = otel
    return True


def teardown() -> None:
    """Flush and stop tracing in this process (the worker's shutdown; tests)."""
    global _otel
    if _otel is not None:
        _otel.stop()
        _otel = None


def active() -> bool:
    return _otel is not None


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to store with a task pushed now; None when
    tracing is off or no span is recording."""
    return _otel.current_traceparent() if _otel is not None else None


def log_fields() -> dict[str, str]:
    """`trace_id` and `span_id` of the current span for log records; {} when off or none."""
    return _otel.log_fields() if _otel is not None else {}


def trace_id_of(traceparent: str | None) -> str:
    """The trace id (32 hex digits) in a traceparent, "" if there is none (pure parsing)."""
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) >= 4 and len(parts[1]) == 32 else ""


def noted(note: str, traceparent: str | None) -> str:
    """An event note with the trace id it belongs to: `pushed (trace 4bf9…)`; the note alone
    without a trace."""
    trace_id = trace_id_of(traceparent)
    return f"{note} (trace {trace_id})" if trace_id else note


def task_span(
    name: str, traceparent: str | None, **attributes: Any
) -> contextlib.AbstractContextManager[Any]:
    """A span for one step of a task's work. Child of the current span when there is one (a
    worker's run continues the trace its message carried); otherwise of the task's stored
    trace context (a pull runner, which got the task from a pop)."""
    if _otel is None:
        return _NOTHING
    return _otel.task_span(name, traceparent, attributes, link_current=False)


def handout_span(
    name: str, traceparent: str | None, **attributes: Any
) -> contextlib.AbstractContextManager[Any]:
    """A span in the task's own trace for a step that serves many tasks at once (a pop, a
    dispatch round): parented on the task's stored context, linked to the current span."""
    if _otel is None:
        return _NOTHING
    return _otel.task_span(name, traceparent, attributes, link_current=True)


def record_handouts(name: str, tasks: Iterable[Any]) -> None:
    """One short span per task handed out at once (a pop), each in its task's own trace."""
    if _otel is None:
        return
    for task in tasks:
        with handout_span(name, task.trace_context, **{"scheduler.task.id": str(task.id)}):
            pass
