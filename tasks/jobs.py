"""Celery task functions of the tasks app (housekeeping run by beat). They take ids or
nothing, and call one service."""

from __future__ import annotations

import uuid
from typing import Any

from celery import shared_task
from django.conf import settings

from tasks import dispatch, dispatch_messages, execution, execution_batch, housekeeping, stats


@shared_task(name="tasks.reap_expired_leases", ignore_result=True)
def reap_expired_leases() -> int:
    """Expired leases back to the retry policy, and due expiries to EXPIRED (one periodic job:
    both are the reaper's, at the same pace)."""
    return housekeeping.tasks_reap_expired() + housekeeping.tasks_expire_due()


@shared_task(name="tasks.prune_finished_tasks", ignore_result=True)
def prune_finished_tasks() -> int:
    return housekeeping.tasks_prune()


@shared_task(name=dispatch_messages.RUN_TASK, bind=True, ignore_result=True, acks_late=True)
def run_task(self: Any, task_id: str, attempt: int) -> str:
    """Run one dispatched attempt of a task (which also refills its queue's broker share)."""
    return execution.execute(
        uuid.UUID(task_id), int(attempt), worker=self.request.hostname or "worker"
    )


@shared_task(name=dispatch_messages.RUN_TASKS, bind=True, ignore_result=True, acks_late=True)
def run_tasks(self: Any, entries: list[list[Any]]) -> list[str]:
    """Run several dispatched attempts one after the other (`[[task_id, attempt], ...]`), each
    as run_task would; the ones not started within WORKER_BATCH_MILLISECONDS are sent again."""
    request = self.request
    return execution_batch.execute_batch(
        execution_batch.parse(entries),
        worker=request.hostname or "worker",
        # The queue it came from (each queue has a direct exchange of its own name, so the
        # routing key names it), for the tasks it sends again.
        celery_queue=(request.delivery_info or {}).get("routing_key")
        or settings.CELERY_TASK_DEFAULT_QUEUE,
        scheduler_id=getattr(request, "scheduler", None) or "",
    )


@shared_task(name="tasks.dispatch", ignore_result=True)
def dispatch_tasks() -> dict[str, int]:
    return dispatch.dispatch_all()


@shared_task(name="tasks.dispatch_scheduler", ignore_result=True)
def dispatch_scheduler(scheduler_id: str) -> int:
    """One queue's dispatch round (sent delayed for a rate-limited queue's next token)."""
    return dispatch.dispatch_scheduler(scheduler_id)


@shared_task(name="tasks.queue_stats_rollup", ignore_result=True)
def queue_stats_rollup() -> int:
    return stats.queue_stats_rollup()
