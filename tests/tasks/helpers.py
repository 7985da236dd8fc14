"""Shared arrangement helpers of the tasks tests (plain functions, no fixtures)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db.models import QuerySet
from kombu.simple import SimpleQueue
from rest_framework.test import APIClient

from pilots.queues import QUEUES
from scheduler_site.celery import app
from tasks import dispatch, services
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tasks.retry import RetrySpec

S = TaskStatus
T0 = datetime(2030, 1, 1, 10, 5, tzinfo=UTC)
Push = Callable[..., Task]


# Created on every migrate (pilots.queues.ensure_queues): present in every test database.
SYSTEM_QUEUES = {queue for queue, _ in QUEUES}


def user_schedulers() -> QuerySet[Scheduler]:
    """The schedulers a test made, without the system queues."""
    return Scheduler.objects.exclude(id__in=SYSTEM_QUEUES)


def pop_one(scheduler_id: str = "boefje", **kwargs: Any) -> Task:
    [task] = services.task_pop(scheduler_id=scheduler_id, **kwargs)
    return task


def make_running(push: Push, **kwargs: Any) -> Task:
    """Push a task and take it to RUNNING (filters on data["id"] when given, else the oldest)."""
    task = push(**kwargs)
    popped = pop_one(task.scheduler_id, filters={"id": task.data["id"]} if task.data else None)
    assert popped.id == task.id
    return services.task_start(task_id=task.id, actor="w")


def fresh(task: Task) -> Task:
    return Task.objects.get(id=task.id)


def history(task: Task) -> list[tuple[str, str, str]]:
    rows = TaskEvent.objects.filter(task_id=task.id).order_by("at", "id")
    return [(e.from_status, e.to_status, e.note) for e in rows]


def finish(push: Push, end: str, **kwargs: Any) -> Task:
    """Push a task and end it FAILED, DEAD or CANCELLED through the services."""
    task = push(**kwargs)
    pop_one(task.scheduler_id)
    if end == S.CANCELLED:
        services.task_start(task_id=task.id)
        services.task_cancel(task_id=task.id)
        services.task_fail(task_id=task.id, error="stopped")
    else:
        spec = RetrySpec(policy="none", dead_letter=end == S.DEAD)
        services.task_fail(task_id=task.id, error="bad", result={"partial": 1}, retry=spec)
    assert fresh(task).status == end
    return task


def forbid_server_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every APIClient response fail the test if it is a 5xx."""
    original = APIClient.request

    def request(self: APIClient, **kwargs: Any) -> Any:
        response = original(self, **kwargs)
        assert response.status_code < 500, (kwargs.get("PATH_INFO"), response.content[:500])
        return response

    monkeypatch.setattr(APIClient, "request", request)


def fill(body: Any, world: dict[str, str]) -> Any:
    """`body` with "{name}" placeholders in its string values taken from `world` (a lease
    token, say, known only once the world is built)."""
    if isinstance(body, dict):
        return {key: fill(value, world) for key, value in body.items()}
    if isinstance(body, list):
        return [fill(item, world) for item in body]
    return body.format(**world) if isinstance(body, str) else body


def call(client: APIClient, method: str, url: str, body: Any = None) -> Any:
    if method in {"get", "delete"}:
        return getattr(client, method)(url)
    return getattr(client, method)(url, body, format="json")


def snapshot() -> tuple[Any, ...]:
    """Everything a refused request must leave unchanged."""
    return (
        list(Task.objects.order_by("id").values()),
        list(Scheduler.objects.order_by("id").values()),
        TaskEvent.objects.count(),
    )


def celery_queue(scheduler_id: str, handler: str, **fields: Any) -> Scheduler:
    """A celery queue whose own retry policy differs from every demo handler's, so a test sees
    which one applied."""
    fields.setdefault("retry_policy", "none")
    fields.setdefault("dead_letter", False)
    return services.scheduler_create(id=scheduler_id, kind="celery", handler=handler, **fields)


def dispatched_task(scheduler_id: str, **data: Any) -> Task:
    task = services.task_push(scheduler_id=scheduler_id, data=data)
    assert dispatch.dispatch_scheduler(scheduler_id) == 1
    return fresh(task)


def running_task(scheduler_id: str, **data: Any) -> Task:
    task = dispatched_task(scheduler_id, **data)
    return services.task_start(
        task_id=task.id, actor="test", attempt=task.attempts, mint_token=True
    )


def purge_broker() -> None:
    with contextlib.suppress(Exception):  # an empty filesystem broker may have no folder yet
        app.control.purge()


def taken_messages(queue_name: str = "") -> list[Any]:
    """Take every message off a queue (the default one unless named), acknowledged."""
    taken = []
    with app.connection_for_write() as conn:
        queue = SimpleQueue(conn, queue_name or app.conf.task_default_queue)
        try:
            while True:
                try:
                    message = queue.get_nowait()
                except SimpleQueue.Empty:
                    break
                message.ack()
                taken.append(message)
        finally:
            queue.close()
    return taken
