"""Reads that grow beyond one ORM call: counts per status, per-hour statistics, and the
queues a runner account is limited to."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, F, QuerySet
from django.db.models.functions import TruncHour
from django.utils import timezone

from tasks.models import RunnerGrant, Scheduler, Task, TaskEvent, TaskStatus
from tasks.roles import OPERATORS

# The queues an account may use: None means every queue.
QueueScope = frozenset[str] | None


def runner_queues(user: AbstractBaseUser | AnonymousUser | None) -> QueueScope:
    """The queues a runner account is limited to (DESIGN 9.1), or None for every queue: an
    account without grants, and any operator, whatever grants it holds."""
    if user is None or not user.is_authenticated:
        return None
    granted = frozenset(
        RunnerGrant.objects.filter(user_id=user.pk).values_list("scheduler_id", flat=True)
    )
    if not granted or user.is_superuser or user.groups.filter(name=OPERATORS).exists():
        return None
    return granted


def scheduler_list(*, queues: QueueScope = None) -> QuerySet[Scheduler]:
    schedulers = Scheduler.objects.all()
    return schedulers if queues is None else schedulers.filter(id__in=queues)


def task_list(*, queues: QueueScope = None) -> QuerySet[Task]:
    tasks = Task.objects.all()
    return tasks if queues is None else tasks.filter(scheduler_id__in=queues)


def task_in_queues(task_id: Any, queues: frozenset[str]) -> bool:
    return Task.objects.filter(id=task_id, scheduler_id__in=queues).exists()


def status_counts(scheduler_ids: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """{scheduler_id: {status: count}} with every status present (zeros included)."""
    queryset = Task.objects.all()
    if scheduler_ids is not None:
        queryset = queryset.filter(scheduler_id__in=list(scheduler_ids))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TaskStatus.values, 0))
    rows = queryset.order_by().values("scheduler_id", "status").annotate(n=Count("id"))
    for row in rows:
        counts[row["scheduler_id"]][row["status"]] = row["n"]
    return counts


def hourly_stats(
    *, scheduler_id: str | None = None, hours: int = 24, queues: QueueScope = None
) -> list[dict[str, Any]]:
    """Transitions into each status per hour over the last `hours`, per scheduler, from the
    event history: a task that retried twice and then completed counts each step once. With
    `queues`, only those queues' (a limited runner's)."""
    since = timezone.now() - timedelta(hours=hours)
    # from == to marks a note (a cancel request), not a transition.
    events = TaskEvent.objects.filter(at__gte=since).exclude(from_status=F("to_status"))
    if scheduler_id:
        events = events.filter(task__scheduler_id=scheduler_id)
    if queues is not None:
        events = events.filter(task__scheduler_id__in=queues)
    rows = (
        events.annotate(hour=TruncHour("at"))
        .values("hour", "task__scheduler_id", "to_status")
        .annotate(count=Count("id"))
        .order_by("hour", "task__scheduler_id", "to_status")
    )
    return [
        {
            "hour": row["hour"],
            "scheduler": row["task__scheduler_id"],
            "status": row["to_status"],
            "count": row["count"],
        }
        for row in rows
    ]
