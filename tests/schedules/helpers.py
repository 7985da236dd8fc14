"""Shared helpers of the schedules tests (plain functions, no fixtures)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from schedules import services
from schedules.models import Schedule
from tasks import services as task_services
from tasks.models import Task

# A Tuesday, 10:05:00 UTC (11:05 in Europe/Amsterdam, winter time).
T0 = datetime(2030, 1, 1, 10, 5, tzinfo=UTC)

Make = Callable[..., Schedule]
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


def fresh(schedule: Schedule) -> Schedule:
    return Schedule.objects.get(id=schedule.id)


def tasks_of(schedule: Schedule) -> list[Task]:
    return list(Task.objects.filter(schedule_id=schedule.id).order_by("created_at", "id"))


def tick(scheduler_id: str = "boefje", **kwargs: Any) -> int:
    return services.orchestrate(**kwargs).get(scheduler_id, 0)


def finish_all(scheduler_id: str = "boefje", result: Any = None) -> int:
    """Pop every due task of the queue and complete it."""
    popped = task_services.task_pop(scheduler_id=scheduler_id, limit=1000)
    for task in popped:
        task_services.task_complete(task_id=task.id, result=result)
    return len(popped)


def arrange(schedules: list[Schedule], rows: list[dict[str, Any]]) -> None:
    """Set up history (deadline, last run, …) that would otherwise take many ticks."""
    for schedule, values in zip(schedules, rows, strict=True):
        Schedule.objects.filter(id=schedule.id).update(**values)
