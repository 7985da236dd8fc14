"""Cron in the schedule's time zone across Europe/Amsterdam's DST changes, driven through the
real orchestrator tick with time-machine: every occurrence runs once, none is lost or doubled.

2026-03-29: 02:00 CET jumps to 03:00 CEST (02:30 does not exist).
2026-10-25: 03:00 CEST falls back to 02:00 CET (02:30 happens twice).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from schedules import services as schedule_services
from schedules.models import Schedule
from tasks import services as task_services
from tasks.models import Scheduler

TICK = timedelta(minutes=5)


def _run_ticks(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    """Tick every 5 minutes from start to end, completing each task at once; return the
    occurrences (the deadlines) that were materialised, in UTC."""
    occurrences: list[datetime] = []
    now = start
    while now <= end:
        with time_machine.travel(now, tick=False):
            due_at = Schedule.objects.get(id=schedule.id).deadline_at
            created = schedule_services.orchestrate().get(schedule.scheduler_id, 0)
            if created:
                occurrences.append(due_at)
                for task in task_services.task_pop(scheduler_id=schedule.scheduler_id, limit=10):
                    task_services.task_complete(task_id=task.id)
        now += TICK
    return occurrences


def _cron_schedule(expression: str, created: datetime) -> Schedule:
    Scheduler.objects.create(id="dst")
    with time_machine.travel(created, tick=False):
        return schedule_services.schedule_create(
            scheduler_id="dst", cron=expression, timezone="Europe/Amsterdam"
        )


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.django_db
def test_cron__nonexistent_local_time_runs_once_at_the_jump() -> None:
    schedule = _cron_schedule("30 2 * * *", utc(2026, 3, 28, 12))

    runs = _run_ticks(schedule, utc(2026, 3, 28, 12), utc(2026, 3, 30, 12))

    # 28th 02:30 CET was before the start; 29th: 02:30 does not exist → 03:00 CEST = 01:00Z;
    # 30th 02:30 CEST = 00:30Z.
    assert runs == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]


@pytest.mark.django_db
def test_cron__ambiguous_local_time_runs_once() -> None:
    schedule = _cron_schedule("30 2 * * *", utc(2026, 10, 24, 12))

    runs = _run_ticks(schedule, utc(2026, 10, 24, 12), utc(2026, 10, 26, 12))

    # 25th: 02:30 CEST = 00:30Z, and not again at 02:30 CET; 26th 02:30 CET = 01:30Z.
    assert runs == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


@pytest.mark.django_db
def test_cron__hourly_across_spring_forward_loses_and_doubles_nothing() -> None:
    schedule = _cron_schedule("0 * * * *", utc(2026, 3, 28, 22, 30))

    runs = _run_ticks(schedule, utc(2026, 3, 28, 22, 30), utc(2026, 3, 29, 4, 30))

    # Every real hour once: the local 02:00 that does not exist is not invented.
    assert runs == [utc(2026, 3, 28, 23), *(utc(2026, 3, 29, h) for h in range(0, 5))]


@pytest.mark.django_db
def test_cron__half_hourly_across_fall_back_runs_every_real_half_hour_once() -> None:
    schedule = _cron_schedule("*/30 * * * *", utc(2026, 10, 24, 23, 10))

    runs = _run_ticks(schedule, utc(2026, 10, 24, 23, 10), utc(2026, 10, 25, 2, 10))

    # Local 02:00 and 02:30 happen twice (CEST, then CET); real time runs each once.
    expected = [utc(2026, 10, 24, 23, 30)] + [
        utc(2026, 10, 25, 0, 0) + timedelta(minutes=30 * i) for i in range(5)
    ]
    assert runs == expected
    assert len(set(runs)) == len(runs)


@pytest.mark.django_db
def test_cron__missed_occurrences_after_downtime_coalesce_into_one_run() -> None:
    schedule = _cron_schedule("*/10 * * * *", utc(2026, 6, 1, 8, 0, 30))

    # Down from 08:00:30 to 09:03: six occurrences missed; the first tick makes one task and
    # moves the deadline to the next occurrence after now, not through the missed ones.
    runs = _run_ticks(schedule, utc(2026, 6, 1, 9, 3), utc(2026, 6, 1, 9, 3))
    schedule.refresh_from_db()

    assert runs == [utc(2026, 6, 1, 8, 10)]
    assert schedule.run_count == 1
    assert schedule.deadline_at == utc(2026, 6, 1, 9, 10)
