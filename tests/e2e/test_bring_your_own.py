"""Bring your own work (DESIGN §9.5) through real Celery workers on a real broker (SQLite +
filesystem, PostgreSQL + Redis): ordinary `@shared_task`s of demo_app as `celery:` handlers,
on a push and on a schedule, with our retries, dead letters, cancel and Celery's soft time
limit; Django Tasks `@task` functions enqueued through the backport's API and read back with
get_result."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from django_tasks import TaskResultStatus

from demo_app import background
from schedules import services as schedule_services
from tasks import services
from tasks.django_tasks import HANDLER
from tasks.models import Task, TaskStatus
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

S = TaskStatus


def _celery_queue(scheduler_id: str, task_name: str, **fields: Any) -> None:
    fields.setdefault("retry_policy", "none")
    fields.setdefault("dead_letter", False)
    services.scheduler_create(
        id=scheduler_id, kind="celery", handler=f"celery:{task_name}", **fields
    )


def _status(task: Task) -> str:
    return Task.objects.get(id=task.id).status


def test_shared_task__runs_on_a_push_on_a_schedule_and_within_its_soft_time_limit(
    start_worker: Any,
) -> None:
    _celery_queue("adder", "demo_app.tasks.add")
    _celery_queue("overrun", "demo_app.tasks.overrun")
    schedule = schedule_services.schedule_create(
        scheduler_id="adder", name="add every second", interval_seconds=1, data={"args": [20, 22]}
    )
    start_worker("byo", pool="prefork", concurrency=2)  # prefork: it enforces time limits

    pushed = services.task_push(scheduler_id="adder", data={"args": [2], "kwargs": {"y": 3}})
    late = services.task_push(scheduler_id="overrun", data={"kwargs": {"seconds": 5}})

    def scheduled_run_done() -> bool:
        schedule_services.orchestrate(scheduler_id="adder")  # the orchestrator's tick
        return Task.objects.filter(schedule=schedule, status=S.COMPLETED).exists()

    wait_for(lambda: _status(pushed) == S.COMPLETED, message="pushed add completed")
    assert Task.objects.get(id=pushed.id).result == 5
    wait_for(scheduled_run_done, message="a scheduled add completed")
    assert Task.objects.filter(schedule=schedule, status=S.COMPLETED).first().result == 42
    wait_for(lambda: _status(late) == S.FAILED, message="overrun stopped by its soft time limit")
    late = Task.objects.get(id=late.id)
    assert (late.error, late.attempts) == ("soft time limit exceeded", 1)


def test_shared_task__self_retry_is_our_retry_then_a_dead_letter_and_cancel_stops_it(
    start_worker: Any,
) -> None:
    _celery_queue(
        "flaky", "demo_app.tasks.flaky", retry_policy="fixed", retry_delay_seconds=0,
        max_attempts=3, dead_letter=True,
    )  # fmt: skip
    _celery_queue("slow", "demo_app.tasks.slow")
    start_worker("byo")

    doomed = services.task_push(scheduler_id="flaky", data={"kwargs": {"fail_rate": 1}})

    wait_for(lambda: _status(doomed) == S.DEAD, message="dead letter after 3 attempts")
    doomed = Task.objects.get(id=doomed.id)
    assert doomed.attempts == 3
    assert doomed.error == "Retry requested by the task: RuntimeError('demo failure on try 3')"
    notes = list(doomed.events.filter(to_status__in=[S.QUEUED, S.DEAD]).values_list("note"))
    assert sum("failed: Retry requested by the task" in note for (note,) in notes) == 3
    assert Counter(doomed.events.values_list("to_status", flat=True))[S.RUNNING] == 3

    long = services.task_push(scheduler_id="slow", data={"kwargs": {"seconds": 60}})
    wait_for(lambda: _status(long) == S.RUNNING, message="slow running")
    services.task_cancel(task_id=long.id, actor="operator")
    wait_for(lambda: _status(long) == S.CANCELLED, timeout=20, message="slow cancelled")
    assert "cancel" in Task.objects.get(id=long.id).error


def test_django_tasks__enqueued_functions_run_and_get_result_reads_them(
    start_worker: Any,
) -> None:
    services.scheduler_create(
        id="default", kind="celery", handler=HANDLER, retry_policy="none", dead_letter=False
    )
    start_worker("byo")

    product = background.multiply.enqueue(6, 7)
    failure = background.fail.enqueue("no good")
    context = background.whoami.enqueue()

    def finished(task: Any, result_id: str) -> Any:
        result = task.get_result(result_id)
        return result if result.is_finished else None

    done = wait_for(lambda: finished(background.multiply, product.id), message="multiply")
    assert (done.status, done.return_value, done.attempts) == (TaskResultStatus.SUCCESSFUL, 42, 1)
    assert done.worker_ids[0].startswith("byo-")
    failed = wait_for(lambda: finished(background.fail, failure.id), message="fail")
    assert failed.status == TaskResultStatus.FAILED
    assert failed.errors[0].exception_class is ValueError
    ran = wait_for(lambda: finished(background.whoami, context.id), message="whoami")
    assert ran.return_value == {"id": context.id, "attempt": 1}
