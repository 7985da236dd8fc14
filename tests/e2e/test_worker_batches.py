"""Several tasks a Celery message (`tasks.run_tasks`, issue 12) through real Celery workers:
every task runs once on two workers, a worker killed mid-batch loses nothing and runs nothing
twice (with and without the batch's message delivered again), and a batch past its time sends
its tail to the other workers. SQLite + filesystem broker, PostgreSQL + Redis or RabbitMQ."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from django.test import override_settings

from scheduler_site.celery import app
from tasks import services
from tasks.dispatch_messages import RUN_TASKS
from tasks.models import Task, TaskEvent, TaskStatus
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

S = TaskStatus


# One second of sleep, no time limit (so it is batched), the queue's retry policy.
SLOW = "celery:demo_app.tasks.slow"


def _queue_paused(scheduler_id: str, handler: str, count: int, **fields: Any) -> list[Task]:
    """A paused celery queue with `count` tasks."""
    services.scheduler_create(
        id=scheduler_id, kind="celery", handler=handler, paused=True, **fields
    )
    data = [{"kwargs": {"seconds": 1}} if handler == SLOW else {"n": n} for n in range(count)]
    return [services.task_push(scheduler_id=scheduler_id, data=item) for item in data]


def _resume(scheduler_id: str) -> None:
    services.scheduler_set_paused(scheduler_id=scheduler_id, paused=False)  # its round, sent


def _events(task: Task, to_status: str) -> int:
    return TaskEvent.objects.filter(task_id=task.id, to_status=to_status).count()


def _batches_received(lines: list[str]) -> int:
    return sum(
        1 for line in lines if f"{RUN_TASKS}[" in line and "Task " in line and "received" in line
    )


def test_worker_batches__two_workers_run_every_task_once(start_worker: Any) -> None:
    pushed = _queue_paused("echo", "demo.echo", 200, dispatch_threshold=40)
    workers = [start_worker(name, pool="prefork", concurrency=2) for name in ("a", "b")]

    _resume("echo")

    wait_for(
        lambda: Task.objects.filter(scheduler_id="echo", status=S.COMPLETED).count() == 200,
        timeout=120,
        message="200 completed",
    )
    for task in Task.objects.filter(id__in=[t.id for t in pushed]):
        assert (task.status, task.attempts) == (S.COMPLETED, 1)
        assert task.result == {"echo": task.data, "attempt": 1}
    events = Counter(
        TaskEvent.objects.filter(task__scheduler_id="echo").values_list("to_status", flat=True)
    )
    assert events == {S.QUEUED: 200, S.DISPATCHED: 200, S.RUNNING: 200, S.COMPLETED: 200}
    assert sum(_batches_received(w.lines) for w in workers) > 0, "no task came in a batch"
    actors = set(
        TaskEvent.objects.filter(task__scheduler_id="echo", to_status=S.RUNNING).values_list(
            "actor", flat=True
        )
    )
    assert len(actors) == 2, f"the batches did not spread over both workers: {actors}"


@pytest.mark.parametrize("redelivered", [False, True], ids=["claim-timeout", "redelivered"])
@override_settings(DISPATCH_MESSAGE_SPREAD=1, TASK_CLAIM_TIMEOUT_SECONDS=8)
def test_worker_batches__sigkill_mid_batch_loses_nothing_and_runs_nothing_twice(
    start_worker: Any, redelivered: bool
) -> None:
    # One message of four 1-second tasks (spread 1 in this process, the dispatcher); the
    # worker is killed while the second runs.
    tasks = _queue_paused(
        "slow", SLOW, 4, dispatch_threshold=4, lease_seconds=5,
        retry_policy="fixed", retry_delay_seconds=0, max_attempts=3,
    )  # fmt: skip
    doomed = start_worker("doomed", environ={"WORKER_BATCH_MILLISECONDS": "60000"})
    _resume("slow")
    entries = [[str(t.id), 1] for t in tasks]
    deadline = time.monotonic() + 60
    while Task.objects.get(id=tasks[1].id).status != S.RUNNING:  # no beat: nothing handed back
        assert time.monotonic() < deadline, "the batch's second task never ran"
        time.sleep(0.05)

    doomed.kill()
    assert _batches_received(doomed.lines) == 1
    start_worker("survivor")
    if redelivered:  # as RabbitMQ does at once (Redis: after its visibility timeout)
        app.send_task(RUN_TASKS, args=[entries])

    wait_for(
        lambda: Task.objects.filter(scheduler_id="slow", status=S.COMPLETED).count() == 4,
        timeout=90,
        message="4 completed",
    )
    first, killed, *rest = (Task.objects.get(id=t.id) for t in tasks)
    assert (first.attempts, _events(first, S.RUNNING)) == (1, 1)
    assert (killed.attempts, _events(killed, S.RUNNING)) == (2, 2)  # reaped by its lease
    assert "lease expired (lost)" in " ".join(killed.events.values_list("note", flat=True))
    for task in rest:  # claimed once: from the redelivery, or sent again by the claim timeout
        assert (task.attempts, _events(task, S.RUNNING)) == (1, 1)
    assert all(_events(t, S.COMPLETED) == 1 for t in tasks)


@override_settings(DISPATCH_MESSAGE_SPREAD=1)
def test_worker_batches__a_batch_past_its_time_sends_its_tail_to_the_other_worker(
    start_worker: Any,
) -> None:
    tasks = _queue_paused("slow", SLOW, 4, dispatch_threshold=4)
    batch_time = {"WORKER_BATCH_MILLISECONDS": "0"}  # resend the tail after the first task
    workers = [start_worker(name, environ=batch_time) for name in ("a", "b")]

    _resume("slow")

    wait_for(
        lambda: Task.objects.filter(scheduler_id="slow", status=S.COMPLETED).count() == 4,
        timeout=60,
        message="4 completed",
    )
    assert sum(_batches_received(w.lines) for w in workers) == 1
    assert all(_events(t, S.RUNNING) == 1 for t in tasks)
    actors = set(
        TaskEvent.objects.filter(task__scheduler_id="slow", to_status=S.RUNNING).values_list(
            "actor", flat=True
        )
    )
    assert len(actors) == 2, f"the tail sent again did not reach the idle worker: {actors}"
