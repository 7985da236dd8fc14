"""Reads that grow beyond one ORM call: counts per status, per-hour statistics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.db.models import Count, F, QuerySet
from django.db.models.functions import TruncHour
from django.utils import timezone

from tasks.models import Task, TaskEvent, TaskStatus


def task_list() -> QuerySet[Task]:
    return Task.objects.all()


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


def hourly_stats(*, scheduler_id: str | None = None, hours: int = 24) -> list[dict[str, Any]]:
    """Transitions into each status per hour over the last `hours`, per scheduler, from the
    event history: a task that retried twice and then completed counts each step once."""
    since = timezone.now() - timedelta(hours=hours)
    # from == to marks a note (a cancel request), not a transition.
    events = TaskEvent.objects.filter(at__gte=since).exclude(from_status=F("to_status"))
    if scheduler_id:
        events = events.filter(task__scheduler_id=scheduler_id)
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
