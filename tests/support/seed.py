"""Seeding the task table for tests and benchmarks, through the queue's own writer (so the
rows and their events are what production writes), and the one sanctioned way for a test to
put tasks straight into a state it wants to examine."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.utils import timezone

from tasks import queue
from tasks.models import Task, status_writer


def seed_queued(scheduler_id: str, count: int, *, batch: int = 1000, **fields: Any) -> int:
    """`count` QUEUED tasks of `scheduler_id` (priorities 0..6 in turn unless `priority` is
    given), inserted in batches with their "queued" events."""
    now = timezone.now()
    for start in range(0, count, batch):
        tasks = [
            Task(
                scheduler_id=scheduler_id,
                created_at=now,
                modified_at=now,
                **{"priority": i % 7, **fields},
            )
            for i in range(start, min(start + batch, count))
        ]
        queue.insert_queued(tasks, actor="seed", note="seeded", at=now)
    return count


def force_status(task_ids: Iterable[Any], status: str, **values: Any) -> int:
    """Put tasks in `status` without a transition or event: only for tests that examine how
    the services treat a row that changed under them (a stale read, a corrupt state)."""
    with status_writer():
        return Task.objects.filter(id__in=list(task_ids)).update(status=status, **values)
