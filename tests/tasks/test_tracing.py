"""OpenTelemetry traces (README, "Tracing"): one trace from a push to the report, across the
dispatch (stored with the task, restored by whoever dispatches) and the worker's run; the
trace id in the task's events; nothing loaded or done with the variables unset.

Spans go to the SDK's InMemorySpanExporter. The worker side runs the real broker's message
through Celery's own task tracer, with the message's headers as its request, as a worker does
(tests/e2e/test_tracing.py does the same with a real worker process)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.app.trace import build_tracer
from django.core.exceptions import ImproperlyConfigured
from kombu.simple import SimpleQueue
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from rest_framework.test import APIClient

from scheduler_site import log_context, otel, tracing
from scheduler_site.celery import app
from tasks import services
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tasks.pull_runner import ApiClient, PullRunner, Work
from tasks.registry import get_handler

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("test", exporter=exporter)
    yield exporter
    tracing.teardown()


def _trace_ids(exporter: InMemorySpanExporter, *names: str) -> dict[str, str]:
    """Each named span's trace id (hex); a name with no span is missing from the answer."""
    found = {span.name: f"{span.context.trace_id:032x}" for span in exporter.get_finished_spans()}
    return {name: found[name] for name in names if name in found}


def _take_message(queue_name: str = "celery") -> Any:
    with app.connection_for_write() as conn:
        queue = SimpleQueue(conn, queue_name)
        try:
            message = queue.get(timeout=5)
            message.ack()
        finally:
            queue.close()
    return message


def _run_as_a_worker(message: Any) -> Any:
    """What a worker does with the message: its headers are the task's request."""
    args, kwargs, _embed = message.decode()
    request = {**message.headers, "hostname": "w-test", "delivery_info": {"is_eager": False}}
    # A worker imports the task modules at start (autodiscovery); a test process has imported
    # them only if an earlier test did (it failed when run alone: NotRegistered).
    app.loader.import_default_modules()
    task = app.tasks[message.headers["task"]]
    return build_tracer(task.name, task, app=app, eager=False)(
        message.headers["id"], args, kwargs, request
    )


# A worker's task start closes a connection left in a transaction: no test transaction here.
@pytest.mark.django_db(transaction=True)
def test_celery_task__push_dispatch_run_and_report_share_one_trace(
    spans: InMemorySpanExporter,
    operator_client: APIClient,
    make_scheduler: Callable[..., Scheduler],
) -> None:
    make_scheduler("echo", kind="celery", handler="demo.echo", paused=True)
    app.control.purge()
    pushed = operator_client.post("/api/schedulers/echo/push/", {"data": {"n": 1}}, "json")
    assert pushed.status_code == 201
    # Dispatched later, outside the push's request (as beat's dispatcher would, or another
    # process): resuming the queue dispatches it, in no span of its own.
    services.scheduler_set_paused(scheduler_id="echo", paused=False)
    task = Task.objects.get(id=pushed.json()["id"])
    assert task.status == TaskStatus.DISPATCHED

    _run_as_a_worker(_take_message())

    trace_id = tracing.trace_id_of(task.trace_context)
    server = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [f"{s.context.trace_id:032x}" for s in server] == [trace_id]
    names = ("task.dispatch", "apply_async/tasks.run_task", "run/tasks.run_task")
    steps = _trace_ids(spans, *names, "task.handler", "task.report")
    assert steps == dict.fromkeys(steps, trace_id) and len(steps) == 5
    assert Task.objects.get(id=task.id).status == TaskStatus.COMPLETED
    events = operator_client.get(f"/api/tasks/{task.id}/events/").json()
    assert [(e["to_status"], e["trace_id"]) for e in events] == [
        (status, trace_id) for status in ("QUEUED", "DISPATCHED", "RUNNING", "COMPLETED")
    ]
    assert events[0]["note"] == f"pushed (trace {trace_id})"


def test_pull_task__push_pop_run_and_report_share_one_trace(
    spans: InMemorySpanExporter,
    live_server: Any,
    runner_client: APIClient,
    scheduler: Scheduler,
) -> None:
    with otel._tracer.start_as_current_span("caller"):  # a service calling push in its trace
        task = services.task_push(scheduler_id=scheduler.id, data={"seconds": 0})
    token = str(runner_client._credentials["HTTP_AUTHORIZATION"]).split()[-1]
    with ApiClient(live_server.url, token, runner_name="r-trace") as client:
        work = Work(handler=get_handler("demo.sleep"))
        assert PullRunner(client=client, scheduler_id=scheduler.id, work=work, max_tasks=1).run()

    trace_id = tracing.trace_id_of(task.trace_context)
    assert trace_id == _trace_ids(spans, "caller")["caller"]
    assert _trace_ids(spans, "task.pop", "runner.task") == {
        "task.pop": trace_id,
        "runner.task": trace_id,
    }
    # The runner's start and report calls, in the trace: their traceparent header takes it
    # to the server.
    calls = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    reports = [f"{s.context.trace_id:032x}" for s in calls if s.name == "PATCH"]
    assert reports == [trace_id, trace_id]  # RUNNING, then COMPLETED
    assert Task.objects.get(id=task.id).status == TaskStatus.COMPLETED
    assert TaskEvent.objects.get(task=task, to_status="QUEUED").note == f"pushed (trace {trace_id})"


@pytest.mark.django_db
def test_batch_push__each_task_keeps_the_requests_trace(
    spans: InMemorySpanExporter, operator_client: APIClient, scheduler: Scheduler
) -> None:
    body = [{"data": {"n": 1}}, {"data": {"n": 2}}]
    answer = operator_client.post(f"/api/schedulers/{scheduler.id}/push/", body, "json").json()
    ids = [item["task"]["id"] for item in answer["results"]]
    [server] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    contexts = set(Task.objects.filter(id__in=ids).values_list("trace_context", flat=True))
    assert {tracing.trace_id_of(c) for c in contexts} == {f"{server.context.trace_id:032x}"}


@pytest.mark.django_db
def test_push__without_tracing_stores_no_trace(
    operator_client: APIClient, scheduler: Scheduler
) -> None:
    assert not tracing.active()
    task = services.task_push(scheduler_id=scheduler.id)
    events = operator_client.get(f"/api/tasks/{task.id}/events/").json()
    assert (task.trace_context, events[0]["note"], events[0]["trace_id"]) == (None, "pushed", "")


def test_setup__with_the_variables_unset_nothing_is_loaded_or_started() -> None:
    """Every process's start-up path (web, worker, beat, runner) in a fresh interpreter."""
    script = (
        "import sys, django; django.setup()\n"
        "import scheduler_site.wsgi\n"
        "from celery.signals import beat_init, worker_process_init\n"
        "from scheduler_site import tracing\n"
        "from tasks import dispatch, execution, pull_runner, services\n"
        "worker_process_init.send(sender=None); beat_init.send(sender=None)\n"
        "print(tracing.setup('runner'), tracing.active(),\n"
        "      sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SCHEDULER_OTEL"))}
    env["DJANGO_SETTINGS_MODULE"] = "scheduler_site.settings_test"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "False False []"


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, False),  # OTEL_* configure; our switch turns on
        ({"SCHEDULER_OTEL": "1"}, True),
        ({"SCHEDULER_OTEL": "true", "OTEL_SDK_DISABLED": "true"}, False),
        ({"SCHEDULER_OTEL": "0"}, False),
    ],
)
def test_wanted__our_switch_turns_it_on_and_opentelemetrys_off(
    environ: dict[str, str], on: bool
) -> None:
    assert tracing.wanted(environ) is on


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER: unknown exporter 'jaeger'"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL='grpc'"),
    ],
)
def test_exporters__a_bad_setting_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], problem: str
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ImproperlyConfigured, match=problem):
        otel._processors(None)


def test_exporters__console_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,none")
    [processor] = otel._processors(None)
    assert type(processor.span_exporter).__name__ == "ConsoleSpanExporter"


def test_sampler__a_lone_client_call_is_no_trace_of_its_own(spans: InMemorySpanExporter) -> None:
    """A worker's heartbeat statement or a runner's empty poll alone: dropped; inside a job's
    or a task's span: kept."""
    with otel._tracer.start_as_current_span("alone", kind=SpanKind.CLIENT):
        pass
    with (
        otel._tracer.start_as_current_span("job"),
        otel._tracer.start_as_current_span("inside", kind=SpanKind.CLIENT),
    ):
        pass
    assert sorted(span.name for span in spans.get_finished_spans()) == ["inside", "job"]


def test_log_fields__json_logs_carry_the_current_trace(spans: InMemorySpanExporter) -> None:
    record = logging.LogRecord("tasks", logging.INFO, __file__, 1, "claimed", None, None)
    with otel._tracer.start_as_current_span("job") as span:
        log_context.ContextFilter().filter(record)
    assert (record.trace_id, record.span_id) == (  # type: ignore[attr-defined]
        f"{span.get_span_context().trace_id:032x}",
        f"{span.get_span_context().span_id:016x}",
    )
