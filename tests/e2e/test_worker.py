"""Tasks through real Celery workers: dispatch, claim, retries, dead letters, locks, cancel,
and a worker killed mid-task. SQLite + filesystem broker, or PostgreSQL + Redis."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest

from scheduler_site.celery import app
from tasks import services
from tasks.models import Task, TaskEvent, TaskStatus
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e

S = TaskStatus


def _celery_scheduler(scheduler_id: str, handler: str, **fields: Any) -> None:
    services.scheduler_create(id=scheduler_id, kind="celery", handler=handler, **fields)


def _statuses(scheduler_id: str) -> Counter[str]:
    return Counter(Task.objects.filter(scheduler_id=scheduler_id).values_list("status", flat=True))


def test_worker__runs_pushed_tasks_to_completion(start_worker: Any) -> None:
    _celery_scheduler("echo", "demo.echo", dispatch_threshold=5)
    start_worker("w1", pool="prefork", concurrency=2)

    pushed = [services.task_push(scheduler_id="echo", data={"n": n}) for n in range(20)]

    wait_for(lambda: _statuses("echo") == {S.COMPLETED: 20}, message="20 completed")
    for task in Task.objects.filter(id__in=[t.id for t in pushed]):
        assert task.result == {"echo": task.data, "attempt": 1}
        steps = list(task.events.values_list("to_status", flat=True))
        assert steps == [S.QUEUED, S.DISPATCHED, S.RUNNING, S.COMPLETED]


def test_worker__failing_handler_retries_then_dead_letters(start_worker: Any) -> None:
    _celery_scheduler("sleepy", "demo.sleep")
    start_worker()

    task = services.task_push(scheduler_id="sleepy", data={"seconds": 0.05, "fail": "boom"})

    wait_for(lambda: _statuses("sleepy") == {S.DEAD: 1}, message="dead letter")
    task.refresh_from_db()
    assert task.attempts == 3 and task.error == "RuntimeError: boom"
    failures = task.events.filter(note__contains="failed: RuntimeError: boom")
    assert failures.count() == 3
    assert task.events.filter(to_status=S.RUNNING).count() == 3

    services.task_requeue(task_id=task.id, actor="operator")
    wait_for(
        lambda: (
            _statuses("sleepy") == {S.DEAD: 1}
            and Task.objects.get(id=task.id).attempts == 3
            and task.events.filter(to_status=S.RUNNING).count() == 6
        ),
        message="replayed dead letter",
    )


def test_worker__redelivered_message_runs_the_attempt_once(start_worker: Any) -> None:
    _celery_scheduler("echo", "demo.echo", paused=True)
    task = services.task_push(scheduler_id="echo", data={"n": 1})
    services.scheduler_set_paused(scheduler_id="echo", paused=False)
    start_worker()

    wait_for(lambda: Task.objects.get(id=task.id).status == S.COMPLETED, message="completed")
    for _ in range(3):  # the same message again, as a broker redelivery would send it
        app.send_task("tasks.run_task", args=[str(task.id), 1])
    stale = app.send_task("tasks.run_task", args=[str(task.id), 7])  # an attempt never dispatched
    assert stale.id

    wait_for(lambda: TaskEvent.objects.filter(task=task).count() >= 4, message="events")
    task.refresh_from_db()
    assert task.status == S.COMPLETED and task.attempts == 1
    assert task.events.filter(to_status=S.RUNNING).count() == 1
    assert task.events.filter(to_status=S.COMPLETED).count() == 1


def test_worker__sigkill_mid_task_comes_back_and_completes_once(start_worker: Any) -> None:
    _celery_scheduler("slow", "demo.sleep", lease_seconds=5)
    first = start_worker("doomed")
    task = services.task_push(scheduler_id="slow", data={"seconds": 4})
    wait_for(lambda: Task.objects.get(id=task.id).status == S.RUNNING, message="running")

    first.kill()
    start_worker("survivor")

    wait_for(lambda: Task.objects.get(id=task.id).status == S.COMPLETED, timeout=90, message="done")
    task.refresh_from_db()
    steps = list(task.events.values_list("to_status", "note"))
    assert [to for to, _ in steps] == [
        S.QUEUED,
        S.DISPATCHED,
        S.RUNNING,
        S.QUEUED,
        S.DISPATCHED,
        S.RUNNING,
        S.COMPLETED,
    ]
    assert "lease expired (lost)" in steps[3][1]
    assert task.attempts == 2 and task.result == {"slept": 4, "attempt": 2}


def test_worker__tasks_sharing_a_mutex_never_overlap(start_worker: Any) -> None:
    _celery_scheduler("locked", "demo.locked", dispatch_threshold=6)
    start_worker("a", pool="prefork", concurrency=2)
    start_worker("b", pool="prefork", concurrency=2)

    for n in range(8):
        services.task_push(scheduler_id="locked", data={"key": "ce-1", "seconds": 0.3, "n": n})

    wait_for(lambda: _statuses("locked") == {S.COMPLETED: 8}, timeout=120, message="8 completed")
    spans = sorted(
        (t.result["started"], t.result["ended"]) for t in Task.objects.filter(scheduler_id="locked")
    )
    for (_, ended), (started, _) in itertools.pairwise(spans):
        assert started >= ended, "two holders of MutexLock('demo', 'ce-1') overlapped"
    waits = Task.objects.filter(scheduler_id="locked", lock_waits__gt=0)
    assert waits.exists(), "with 4 worker processes some task must have found the lock held"
    assert set(Task.objects.filter(scheduler_id="locked").values_list("attempts", flat=True)) == {1}


def test_worker__running_task_cancelled_cooperatively(start_worker: Any) -> None:
    _celery_scheduler("slow", "demo.sleep")
    start_worker()
    task = services.task_push(scheduler_id="slow", data={"seconds": 60})
    wait_for(lambda: Task.objects.get(id=task.id).status == S.RUNNING, message="running")

    services.task_cancel(task_id=task.id, actor="operator")

    wait_for(
        lambda: Task.objects.get(id=task.id).status == S.CANCELLED, timeout=30, message="cancelled"
    )
    task.refresh_from_db()
    assert "cancel" in task.error
