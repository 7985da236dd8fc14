"""Several tick runners at once over the same due schedules: each occurrence becomes exactly
one task. Runs on both databases (SQLite with fewer schedules: its writers take turns)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from schedules import services
from schedules.models import Schedule
from tasks import services as task_services
from tasks.exceptions import QueueFull
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tests.processes import run_in_processes

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]


def _due_schedules(scheduler_id: str, count: int) -> None:
    now = timezone.now()
    Schedule.objects.bulk_create(
        [
            Schedule(
                scheduler_id=scheduler_id,
                interval_seconds=3600,
                deadline_at=now - timedelta(seconds=1 + i % 600),
                start_at=now - timedelta(hours=1),
                data={"n": i},
                priority=i % 5,
            )
            for i in range(count)
        ],
        batch_size=2000,
    )


def _tick(index: int, scheduler_id: str) -> int:
    return services.orchestrate(scheduler_id=scheduler_id, batch_size=250).get(scheduler_id, 0)


def test_orchestrate__four_concurrent_tickers_materialise_each_occurrence_once() -> None:
    total = 10_000 if connection.vendor == "postgresql" else 2_000
    Scheduler.objects.create(id="fleet")
    _due_schedules("fleet", total)

    created = run_in_processes(4, _tick, "fleet")

    assert sum(created) == total
    per_schedule = Counter(
        Task.objects.filter(scheduler_id="fleet").values_list("schedule_id", flat=True)
    )
    assert len(per_schedule) == total
    assert set(per_schedule.values()) == {1}
    assert not Schedule.objects.filter(deadline_at__lte=timezone.now()).exists()
    assert set(Schedule.objects.values_list("run_count", flat=True)) == {1}
    assert TaskEvent.objects.filter(note="materialised from its schedule").count() == total
    if connection.vendor == "postgresql":
        assert sum(1 for n in created if n) > 1, "SKIP LOCKED should let tickers share the work"

    again = run_in_processes(4, _tick, "fleet")
    assert sum(again) == 0


def _tick_or_push(index: int, scheduler_id: str) -> int:
    if index % 2:
        return _tick(index, scheduler_id)
    pushed = 0
    for _ in range(40):
        try:
            task_services.task_push(scheduler_id=scheduler_id, data={"by": index})
            pushed += 1
        except QueueFull:
            pass
    return pushed


def test_orchestrate__tickers_and_pushers_together_never_overfill_a_bounded_queue() -> None:
    Scheduler.objects.create(id="bounded", max_queue_size=100)
    _due_schedules("bounded", 300)

    run_in_processes(4, _tick_or_push, "bounded")

    assert Task.objects.filter(scheduler_id="bounded", status=TaskStatus.QUEUED).count() == 100
    per_schedule = Counter(
        Task.objects.filter(scheduler_id="bounded", schedule__isnull=False).values_list(
            "schedule_id", flat=True
        )
    )
    assert set(per_schedule.values()) <= {1}
