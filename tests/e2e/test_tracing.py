"""One OpenTelemetry trace across real processes (README, "Tracing"): a push over HTTP to a
real gunicorn, its dispatch there on commit, the run and report on a real Celery worker. Both
processes export with the console exporter (one JSON span a line), which the harness keeps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.db import connection
from rest_framework.test import APIClient

from scheduler_site import tracing
from tasks import services
from tasks.models import Task, TaskStatus
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def traced_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The environment the server and the worker start with (taken by their fixtures, which
    come after this one)."""
    monkeypatch.setenv("SCHEDULER_OTEL", "1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    yield


def _spans(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{") and '"trace_id"' in line]


def _steps(spans: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Span name -> (trace id, service name)."""
    return {
        span["name"]: (
            span["context"]["trace_id"][2:],
            span["resource"]["attributes"]["service.name"],
        )
        for span in spans
    }


def test_push_over_http_to_the_workers_report__one_trace(
    traced_processes: None, start_server: Any, start_worker: Any, operator_client: APIClient
) -> None:
    services.scheduler_create(id="echo", kind="celery", handler="demo.echo")
    server, worker = start_server(), start_worker("w1")
    token = str(operator_client._credentials["HTTP_AUTHORIZATION"])

    pushed = httpx.post(
        f"{server.url}/api/schedulers/echo/push/",
        json={"data": {"n": 1}},
        headers={"Authorization": token},
    )
    assert pushed.status_code == 201, pushed.text
    task_id = pushed.json()["id"]
    wait_for(
        lambda: Task.objects.get(id=task_id).status == TaskStatus.COMPLETED, message="completed"
    )

    trace_id = tracing.trace_id_of(Task.objects.get(id=task_id).trace_context)
    web = _steps(_spans(server.log.read_text().splitlines()))
    ran = _steps(_spans(worker.lines))
    [push] = [name for name in web if name.startswith("POST api/schedulers/")]
    assert push.endswith("/push/$")  # the server span of the push (named by its URL pattern)
    for name in (push, "task.dispatch", "apply_async/tasks.run_task"):
        assert web[name] == (trace_id, "scheduler-web")
    for name in ("run/tasks.run_task", "task.handler", "task.report"):
        assert ran[name] == (trace_id, "scheduler-worker")
    if connection.vendor == "postgresql":  # psycopg's instrumentation: the worker's SQL
        statements = [s for s in _spans(worker.lines) if s["attributes"].get("db.system")]
        assert {s["context"]["trace_id"][2:] for s in statements} == {trace_id}
    events = operator_client.get(f"/api/tasks/{task_id}/events/").json()
    assert {event["trace_id"] for event in events} == {trace_id}
