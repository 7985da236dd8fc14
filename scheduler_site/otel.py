"""OpenTelemetry itself: the tracer provider, its exporters and the official instrumentations
(Django, Celery, psycopg, httpx). Imported only by `scheduler_site.tracing.setup()` when
tracing is on, so a process with tracing off never loads any of it (README, "Tracing").

Configuration is OpenTelemetry's own environment: OTEL_SERVICE_NAME (default
`scheduler-<role>`), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_EXPORTER (`otlp`, the default;
`console`; `none`; several comma-separated), OTEL_EXPORTER_OTLP_ENDPOINT and its kin (read by
the OTLP exporter; http/protobuf only), OTEL_TRACES_SAMPLER (read by the SDK),
OTEL_PYTHON_DJANGO_EXCLUDED_URLS.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.django import DjangoInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanProcessor,
)
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

INSTRUMENTORS = (
    DjangoInstrumentor,
    CeleryInstrumentor,
    PsycopgInstrumentor,
    HTTPXClientInstrumentor,
)
# Probes every few seconds would bury the traces worth reading.
DEFAULT_EXCLUDED_URLS = "healthz,metrics"

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()


def start(role: str, *, exporter: SpanExporter | None = None) -> None:
    """The provider with the configured exporters (or `exporter` alone), and every
    instrumentation pointed at it."""
    global _provider, _tracer
    # The sampler OTEL_TRACES_SAMPLER names (the SDK reads it), behind our filter.
    configured = TracerProvider(shutdown_on_exit=False).sampler
    provider = TracerProvider(resource=_resource(role), sampler=NoLoneClientCalls(configured))
    for processor in _processors(exporter):
        provider.add_span_processor(processor)
    if exporter is None:
        # The process-wide provider, so handlers' own spans (trace.get_tracer) land in the
        # same traces. Tests pass their exporter and leave the global alone: it can be set
        # only once per process.
        trace.set_tracer_provider(provider)
    excluded = os.environ.get("OTEL_PYTHON_DJANGO_EXCLUDED_URLS", DEFAULT_EXCLUDED_URLS)
    DjangoInstrumentor().instrument(tracer_provider=provider, excluded_urls=excluded)
    CeleryInstrumentor().instrument(tracer_provider=provider)
    PsycopgInstrumentor().instrument(tracer_provider=provider, enable_commenter=False)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    _provider, _tracer = provider, provider.get_tracer("scheduler")


def stop() -> None:
    global _provider, _tracer
    for instrumentor in INSTRUMENTORS:
        instrumentor().uninstrument()
    if _provider is not None:
        _provider.shutdown()  # exports what the batch processor still holds
    _provider, _tracer = None, trace.NoOpTracer()


class NoLoneClientCalls(Sampler):
    """Drops a client span (an SQL statement, an HTTP call) that would start a trace of its
    own: a worker's registration heartbeat, the reaper's scan, a runner's empty long poll.
    Alone they are one-span traces every few seconds that bury the tasks' traces; inside a
    request, a job's run or a task's span they are kept. Everything else is the configured
    sampler's call."""

    def __init__(self, delegate: Sampler) -> None:
        self.delegate = delegate

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind == trace.SpanKind.CLIENT and not parent.is_valid:
            return SamplingResult(Decision.DROP)
        return self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"NoLoneClientCalls{{{self.delegate.get_description()}}}"


def _resource(role: str) -> Resource:
    attributes: dict[str, Any] = {"scheduler.role": role}
    named = os.environ.get("OTEL_SERVICE_NAME") or (
        "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    )
    if not named:
        attributes["service.name"] = f"scheduler-{role}"
    return Resource.create(attributes)


def _processors(exporter: SpanExporter | None) -> list[SpanProcessor]:
    if exporter is not None:
        return [SimpleSpanProcessor(exporter)]
    names = os.environ.get("OTEL_TRACES_EXPORTER") or "otlp"
    processors: list[SpanProcessor] = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name in ("", "none"):
            continue
        if name == "console":
            # One JSON object a line on the real stdout (a Celery worker redirects sys.stdout
            # to its log), written as each span ends: for a look, or a log collector.
            console = ConsoleSpanExporter(out=sys.__stdout__ or sys.stdout, formatter=_one_line)
            processors.append(SimpleSpanProcessor(console))
        elif name == "otlp":
            _check_protocol()
            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            raise ImproperlyConfigured(
                f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use otlp, console or none."
            )
    return processors


def _check_protocol() -> None:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise ImproperlyConfigured(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only http/protobuf is installed "
            "(the collector's port 4318)."
        )


def _one_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def log_fields() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def task_span(
    name: str, traceparent: str | None, attributes: Mapping[str, Any], *, link_current: bool
) -> AbstractContextManager[trace.Span]:
    """See scheduler_site.tracing.task_span and handout_span."""
    current = trace.get_current_span().get_span_context()
    stored = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
    parent, links = None, None
    if stored is not None and (link_current or not current.is_valid):
        parent = stored
        if current.is_valid:
            links = [trace.Link(current)]
    return _tracer.start_as_current_span(
        name, context=parent, links=links, attributes=dict(attributes)
    )
