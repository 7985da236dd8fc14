"""Celery queues per scheduler through real workers: dedicated pools started with `-Q` take
only their queues, so a queue of slow tasks does not delay another queue's; a worker started
with `--all-queues` (as `make run`'s) also serves a queue created after it started."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import pytest

from tasks import services
from tasks.models import ACTIVE_STATUSES, Task, TaskEvent, TaskStatus
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

S = TaskStatus


def _statuses(scheduler_id: str) -> Counter[str]:
    return Counter(Task.objects.filter(scheduler_id=scheduler_id).values_list("status", flat=True))


def _workers(scheduler_id: str) -> set[str]:
    """Who claimed the queue's tasks (the actor of each RUNNING event), by pool name."""
    running = TaskEvent.objects.filter(task__scheduler_id=scheduler_id, to_status=S.RUNNING)
    return {actor.split("-")[0] for actor in running.values_list("actor", flat=True)}


def test_worker_pools__a_queue_of_slow_tasks_does_not_delay_another_queue(
    start_worker: Any,
) -> None:
    slow_queue = f"slow-{os.getpid()}"
    services.scheduler_create(
        id="slow", kind="celery", handler="demo.sleep", celery_queue=slow_queue,
        dispatch_threshold=10,
    )  # fmt: skip
    services.scheduler_create(id="fast", kind="celery", handler="demo.echo")  # default queue
    start_worker("slowpool", queues=[slow_queue])
    start_worker("fastpool")  # no -Q: Celery's default queue and the system queue
    # Wait until the fast pool serves its queue, so its start-up time (seconds on a loaded
    # CI machine) is not counted against the slow queue below.
    warm_up = services.task_push(scheduler_id="fast", data={"n": -1})
    wait_for(lambda: Task.objects.get(id=warm_up.id).status == S.COMPLETED, timeout=60,
             message="fast pool ready")  # fmt: skip
    for n in range(4):
        services.task_push(scheduler_id="slow", data={"seconds": 15, "n": n})
    wait_for(lambda: _statuses("slow")[S.RUNNING] == 1, message="a slow task running")

    for n in range(10):
        services.task_push(scheduler_id="fast", data={"n": n})
    wait_for(lambda: _statuses("fast") == {S.COMPLETED: 11}, timeout=60, message="fast done")

    # 4 slow tasks take 60 s on their one-process pool. Sharing one queue, the fast tasks would
    # have waited behind at least three of them (45 s); on their own pool they finish while
    # at most two are done, which leaves a margin of 30 s for a loaded machine.
    slow = _statuses("slow")
    assert slow[S.COMPLETED] <= 2, f"the fast queue waited for the slow one: {slow}"
    assert _workers("slow") == {"slowpool"} and _workers("fast") == {"fastpool"}
    for task in Task.objects.filter(scheduler_id="slow", status__in=ACTIVE_STATUSES):
        services.task_cancel(task_id=task.id, actor="test")  # no need to wait for them


def test_worker__all_queues_serves_a_queue_created_after_it_started(start_worker: Any) -> None:
    worker = start_worker("everything", options=["--all-queues"])
    late_queue = f"late-{os.getpid()}"
    services.scheduler_create(
        id="late", kind="celery", handler="demo.echo", celery_queue=late_queue
    )

    task = services.task_push(scheduler_id="late", data={"n": 1})

    wait_for(lambda: Task.objects.get(id=task.id).status == S.COMPLETED, message="completed")
    assert any(f"now consuming Celery queue {late_queue}" in line for line in worker.lines)


def test_worker__json_logs_name_the_task_its_scheduler_and_attempt(start_worker: Any) -> None:
    services.scheduler_create(id="echo", kind="celery", handler="demo.echo")
    worker = start_worker("json", environ={"LOG_FORMAT": "json"})

    task = services.task_push(scheduler_id="echo", data={"n": 1})

    wait_for(lambda: Task.objects.get(id=task.id).status == S.COMPLETED, message="completed")
    records = [json.loads(line) for line in worker.lines if line.startswith("{")]
    about = [r for r in records if r.get("task_id") == str(task.id)]
    assert {r["message"].split(" by ")[0] for r in about} >= {
        f"task {task.id} DISPATCHED -> RUNNING",
        f"task {task.id} RUNNING -> COMPLETED",
    }, about
    assert {(r["scheduler"], r["attempt"], r["celery_task"]) for r in about} == {
        ("echo", 1, "tasks.run_task")
    }
    assert any(r.get("logger", "").startswith("celery") for r in records), "Celery's own lines"
