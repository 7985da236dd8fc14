"""Cron in the schedule's time zone across DST changes, driven through the real orchestrator
tick with time-machine: every occurrence runs once, none is lost or doubled.

Europe/Amsterdam, 2026-03-29: 02:00 CET jumps to 03:00 CEST (02:30 does not exist).
Europe/Amsterdam, 2026-10-25 (2025-10-26): 03:00 CEST falls back to 02:00 CET (02:30 happens
twice: 00:30Z, then 01:30Z). America/New_York, 2025-11-02: 02:00 EDT falls back to 01:00 EST
(01:30 happens twice: 05:30Z, then 06:30Z).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from itertools import islice

import pytest
import time_machine
from cronsim import CronSim
from django.core.exceptions import ValidationError

from schedules import services as schedule_services
from schedules import timing
from schedules.models import Schedule, ScheduleStatus
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


def _cron_schedule(
    expression: str, created: datetime, tz_name: str = "Europe/Amsterdam"
) -> Schedule:
    Scheduler.objects.create(id="dst")
    with time_machine.travel(created, tick=False):
        return schedule_services.schedule_create(
            scheduler_id="dst", cron=expression, timezone=tz_name
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


# --- the repeated hour: the next occurrence is always after `after` ---------------------------

AMS, NYC = "Europe/Amsterdam", "America/New_York"


@pytest.mark.parametrize(
    ("expression", "tz_name", "after", "expected"),
    [
        # The case: 02:10 CET (the second 02:10) gave 02:30 CEST, 00:30Z: the past.
        ("30 2 * * *", AMS, utc(2025, 10, 26, 1, 10), utc(2025, 10, 27, 1, 30)),
        ("30 2 * * *", AMS, utc(2025, 10, 26, 1, 0), utc(2025, 10, 27, 1, 30)),
        ("30 2 * * *", AMS, utc(2025, 10, 26, 1, 45, 30), utc(2025, 10, 27, 1, 30)),
        ("0,30 2 * * *", AMS, utc(2025, 10, 26, 1, 10), utc(2025, 10, 27, 1, 0)),
        ("0,30 2 * * *", AMS, utc(2025, 10, 26, 1, 40), utc(2025, 10, 27, 1, 0)),
        ("30 1 * * *", NYC, utc(2025, 11, 2, 6, 10), utc(2025, 11, 3, 6, 30)),
        ("0,30 1 * * *", NYC, utc(2025, 11, 2, 6, 0, 1), utc(2025, 11, 3, 6, 0)),
        # The first pass is as before: a fixed local time runs there, once.
        ("30 2 * * *", AMS, utc(2025, 10, 26, 0, 10), utc(2025, 10, 26, 0, 30)),
        ("0,30 2 * * *", AMS, utc(2025, 10, 26, 0, 10), utc(2025, 10, 26, 0, 30)),
        ("30 1 * * *", NYC, utc(2025, 11, 2, 5, 10), utc(2025, 11, 2, 5, 30)),
        # A wildcard hour follows real time, through the second pass too.
        ("*/30 * * * *", AMS, utc(2025, 10, 26, 1, 10), utc(2025, 10, 26, 1, 30)),
        ("15 * * * *", NYC, utc(2025, 11, 2, 6, 10), utc(2025, 11, 2, 6, 15)),
    ],
)
def test_next_cron__inside_the_repeated_hour_is_after_after(
    expression: str, tz_name: str, after: datetime, expected: datetime
) -> None:
    assert timing.next_cron(expression, tz_name, after=after) == expected


@pytest.mark.parametrize(
    ("tz_name", "night"), [(AMS, utc(2025, 10, 25, 22)), (NYC, utc(2025, 11, 2, 3))]
)
@pytest.mark.parametrize(
    "expression", ["30 2 * * *", "0,30 2 * * *", "30 1 * * *", "* 1,2 * * *", "*/7 * * * *"]
)
def test_next_cron__strictly_after_after_at_every_second_of_a_fall_back_night(
    expression: str, tz_name: str, night: datetime
) -> None:
    for step in range(0, 6 * 3600, 37):  # 37 s: every minute, and seconds off the minute
        after = night + timedelta(seconds=step)
        assert timing.next_cron(expression, tz_name, after=after) > after, after


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("expression", "tz_name", "created", "next_run"),
    [
        ("30 2 * * *", AMS, utc(2025, 10, 26, 1, 10), utc(2025, 10, 27, 1, 30)),
        ("0,30 2 * * *", AMS, utc(2025, 10, 26, 1, 10), utc(2025, 10, 27, 1, 0)),
        ("30 1 * * *", NYC, utc(2025, 11, 2, 6, 10), utc(2025, 11, 3, 6, 30)),
    ],
)
def test_cron__created_in_the_repeated_hour_is_not_due_at_every_tick(
    expression: str, tz_name: str, created: datetime, next_run: datetime
) -> None:
    # It was due at once (the first pass's time, in the past), and again after every run
    # until the hour had passed: a task per tick for 20-60 minutes.
    schedule = _cron_schedule(expression, created, tz_name)

    runs = _run_ticks(schedule, created, created + timedelta(hours=1))

    assert runs == []
    assert Schedule.objects.get(id=schedule.id).deadline_at == next_run


@pytest.mark.django_db
def test_cron__catching_up_in_the_repeated_hour_runs_once() -> None:
    schedule = _cron_schedule("0,30 2 * * *", utc(2025, 10, 25, 12))

    # Down from 12:00Z the day before until 01:10Z, the second 02:10: the missed 02:00 and
    # 02:30 (the first ones) coalesce into one run; the next is the next day's 02:00.
    runs = _run_ticks(schedule, utc(2025, 10, 26, 1, 10), utc(2025, 10, 26, 2, 10))

    assert runs == [utc(2025, 10, 26, 0, 0)]
    assert Schedule.objects.get(id=schedule.id).deadline_at == utc(2025, 10, 27, 1, 0)


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["resume", "edit"])
def test_cron__resumed_or_edited_in_the_repeated_hour_is_not_due_at_every_tick(how: str) -> None:
    schedule = _cron_schedule("30 1 * * *", utc(2025, 11, 1, 12), NYC)
    if how == "resume":
        schedule_services.schedule_pause(schedule_id=schedule.id)
    with time_machine.travel(utc(2025, 11, 2, 6, 10), tick=False):  # the second 01:10
        if how == "resume":
            schedule_services.schedule_resume(schedule_id=schedule.id)
        else:
            schedule_services.schedule_update(schedule_id=schedule.id, priority=5)

    runs = _run_ticks(schedule, utc(2025, 11, 2, 6, 10), utc(2025, 11, 2, 7, 10))

    assert runs == []
    assert Schedule.objects.get(id=schedule.id).deadline_at == utc(2025, 11, 3, 6, 30)


# --- day of month and day of week (the README states this rule) -------------------------------


@pytest.mark.parametrize(
    ("expression", "days"),
    [
        # Neither starts with '*': either matches (OR), as in every cron.
        ("0 0 1 * MON", ["Mon 08", "Mon 15", "Mon 22", "Mon 29", "Wed 01", "Mon 06"]),
        ("0 0 1-31 * MON", ["Tue 02", "Wed 03", "Thu 04", "Fri 05", "Sat 06", "Sun 07"]),
        # Either starts with '*': both must match (AND), as Vixie/Debian cron.
        ("0 0 */2 * MON", ["Mon 15", "Mon 29", "Mon 13", "Mon 27", "Mon 03", "Mon 17"]),
        ("0 0 1 * */2", ["Sat 01", "Thu 01", "Sun 01", "Sun 01", "Sat 01", "Tue 01"]),
        ("0 0 * * MON", ["Mon 08", "Mon 15", "Mon 22", "Mon 29", "Mon 06", "Mon 13"]),
    ],
)
def test_cronsim__day_of_month_and_week_and_when_either_starts_with_a_star(
    expression: str, days: list[str]
) -> None:
    start = datetime(2025, 9, 1)  # a Monday, the 1st; the start itself is not a match
    assert [d.strftime("%a %d") for d in islice(CronSim(expression, start), 6)] == days


# --- a cron that never matches ----------------------------------------------------------------

NEVER = "1 1 */100 * MON#4"  # from cronsim's tests: the 1st (*/100) that is a fourth Monday


def test_validate_cron__an_expression_that_never_matches_is_refused() -> None:
    with pytest.raises(timing.TimingError, match="never matches") as refused:
        timing.validate_cron(NEVER)
    assert refused.value.field == "cron"
    timing.validate_cron("0 0 29 2 1")  # rare (the 29th of February or a Monday), but valid


def test_next_cron__none_when_never_or_past_the_calendar() -> None:
    assert timing.next_cron(NEVER, AMS, after=utc(2025, 1, 1)) is None
    assert timing.next_cron("0 0 * * *", AMS, after=datetime(9999, 12, 31, 10, tzinfo=UTC)) is None


@pytest.mark.django_db
def test_schedule_create__a_cron_that_never_matches_is_refused_on_cron() -> None:
    Scheduler.objects.create(id="dst")
    with pytest.raises(ValidationError) as refused:
        schedule_services.schedule_create(scheduler_id="dst", cron=NEVER)
    assert list(refused.value.message_dict) == ["cron"]
    assert not Schedule.objects.exists()


def _never_matching_row(status: str = ScheduleStatus.ACTIVE) -> Schedule:
    """A row from before the check (it was saved with another cron, then changed in SQL)."""
    schedule = _cron_schedule("*/5 * * * *", utc(2025, 6, 1, 8))
    Schedule.objects.filter(id=schedule.id).update(cron=NEVER, status=status)
    return schedule


@pytest.mark.django_db
def test_cron__a_row_that_never_matches_finishes_at_the_tick_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    schedule = _never_matching_row()

    with caplog.at_level(logging.WARNING, logger="schedules.models"):
        runs = _run_ticks(schedule, utc(2025, 6, 1, 8, 5), utc(2025, 6, 1, 8, 30))

    assert runs == [utc(2025, 6, 1, 8, 0)]  # the deadline it had, then no more
    assert Schedule.objects.get(id=schedule.id).status == ScheduleStatus.FINISHED
    assert f"schedule {schedule.id}: cron {NEVER!r} has no occurrence" in caplog.text


@pytest.mark.django_db
def test_cron__a_row_that_never_matches_is_finished_on_resume_and_refused_on_edit() -> None:
    schedule = _never_matching_row(ScheduleStatus.PAUSED)

    with time_machine.travel(utc(2025, 6, 1, 9), tick=False):
        resumed = schedule_services.schedule_resume(schedule_id=schedule.id)
        with pytest.raises(ValidationError) as refused:
            schedule_services.schedule_update(schedule_id=schedule.id, priority=1)
        edited = schedule_services.schedule_update(schedule_id=schedule.id, cron="0 * * * *")

    assert resumed.status == ScheduleStatus.FINISHED and resumed.deadline_at is None
    assert list(refused.value.message_dict) == ["cron"]
    assert (edited.status, edited.deadline_at) == (ScheduleStatus.ACTIVE, utc(2025, 6, 1, 9))
