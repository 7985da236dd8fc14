"""manage.py import_beat (DESIGN §9.5): a database seeded with every kind of django-celery-beat
PeriodicTask becomes Schedules on `celery:<task>` queues; re-runs update, never duplicate;
--dry-run changes nothing; --disable-source stops beat running what was converted."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    PeriodicTasks,
    SolarSchedule,
)
from time_machine import TimeMachineFixture

from scheduler_site.periodic import system_jobs
from schedules.beat_import import DST_NOTE, import_periodic_tasks, scheduler_id_for
from schedules.models import Schedule, ScheduleStatus
from tasks import services as task_services
from tasks.models import Scheduler
from tests.schedules.helpers import T0

pytestmark = pytest.mark.django_db

ADD = "demo_app.tasks.add"


def _periodic(name: str, task: str = ADD, **fields: Any) -> PeriodicTask:
    for key in ("args", "kwargs"):
        if key in fields and not isinstance(fields[key], str):
            fields[key] = json.dumps(fields[key])
    return PeriodicTask.objects.create(name=name, task=task, **fields)


def _every(every: int, period: str) -> IntervalSchedule:
    return IntervalSchedule.objects.create(every=every, period=period)


def _cron(minute: str, hour: str, zone: str = "UTC", dow: str = "*") -> CrontabSchedule:
    return CrontabSchedule.objects.create(minute=minute, hour=hour, day_of_week=dow, timezone=zone)


@pytest.fixture
def seeded(clock: TimeMachineFixture) -> None:
    """One PeriodicTask of every kind beat has, and of every way one cannot convert."""
    call_command("setup_periodic_tasks", stdout=StringIO())  # our own jobs: skipped
    amsterdam = _cron("30", "2", "Europe/Amsterdam")
    _periodic("nightly report", crontab=amsterdam, args=[1, 2])
    _periodic("weekday quarter", crontab=_cron("*/15", "*", dow="1-5"), kwargs={"x": 1, "y": 2},
              queue="reports")  # fmt: skip
    _periodic("paused flaky", "demo_app.tasks.flaky", interval=_every(30, "seconds"),
              kwargs={"fail_rate": 0}, enabled=False)  # fmt: skip
    _periodic("every 2 days", interval=_every(2, "days"), args=[1, 1],
              start_time=T0 + timedelta(days=1), last_run_at=T0 - timedelta(hours=5),
              total_run_count=5)  # fmt: skip
    _periodic("sub-second", interval=_every(500_000, "microseconds"), args=[1, 1])
    launch = ClockedSchedule.objects.create(clocked_time=T0 + timedelta(hours=2))
    _periodic("at launch", clocked=launch, one_off=True, args=[3, 4])
    past = ClockedSchedule.objects.create(clocked_time=T0 - timedelta(days=3))
    _periodic("launched", clocked=past, one_off=True, args=[3, 4], enabled=False,
              total_run_count=1)  # fmt: skip
    _periodic("once at nine", crontab=_cron("0", "9"), one_off=True, args=[5, 6])
    solar = SolarSchedule.objects.create(event="sunrise", latitude=52.37, longitude=4.89)
    _periodic("at sunrise", solar=solar, args=[1, 1])
    _periodic("with expiry", interval=_every(60, "seconds"), args=[1, 1], expire_seconds=30,
              priority=5, exchange="fanout")  # fmt: skip
    _periodic("bad args", interval=_every(60, "seconds"), args="not json")
    _periodic("misfit", interval=_every(60, "seconds"), args=[1])
    _periodic("gone", "nope.tasks.gone", interval=_every(60, "seconds"))
    _periodic("a/b", interval=_every(60, "seconds"), args=[1, 1])
    task_services.scheduler_create(id="demo_app-tasks-slow", kind="pull")
    _periodic("taken", "demo_app.tasks.slow", interval=_every(60, "seconds"))


def _outcomes(rows: list[Any]) -> dict[str, str]:
    return {row.name: row.outcome for row in rows}


def _notes(rows: list[Any], name: str) -> str:
    return " | ".join(next(row.notes for row in rows if row.name == name))


def _schedule(name: str) -> Schedule:
    return Schedule.objects.get(name=name)


def test_import__every_variant_converted_or_reported(seeded: None) -> None:
    rows = import_periodic_tasks()

    outcomes = _outcomes(rows)
    assert {n for n, o in outcomes.items() if o == "created"} == {
        "nightly report", "weekday quarter", "paused flaky", "every 2 days", "at launch",
        "launched", "once at nine", "with expiry",
    }  # fmt: skip
    assert {n for n, o in outcomes.items() if o == "not converted"} == {
        "sub-second", "at sunrise", "bad args", "misfit", "gone", "a/b", "taken",
    }  # fmt: skip
    # The scheduler's own jobs (setup_periodic_tasks wrote them) are left alone.
    own = {job.name for job in system_jobs()}
    assert {n for n, o in outcomes.items() if o == "skipped"} == own
    assert "no cron equivalent" in _notes(rows, "at sunrise")
    assert "whole seconds, at least 1" in _notes(rows, "sub-second")
    assert "not JSON" in _notes(rows, "bad args")
    assert "missing 1 required positional argument: 'y'" in _notes(rows, "misfit")
    assert "no task 'nope.tasks.gone' is registered" in _notes(rows, "gone")
    assert "name has a '/'" in _notes(rows, "a/b")
    assert "exists and runs pull runners" in _notes(rows, "taken")
    assert DST_NOTE in _notes(rows, "nightly report")
    assert DST_NOTE not in _notes(rows, "weekday quarter")  # UTC
    expiry = _notes(rows, "with expiry")
    assert "expire" not in expiry and "priority 5" in expiry  # expire_seconds carries over
    assert "exchange, routing_key and headers" in expiry
    assert "queue 'reports'" in _notes(rows, "weekday quarter")


def test_import__what_each_schedule_becomes(seeded: None) -> None:
    import_periodic_tasks()

    nightly = _schedule("nightly report")
    assert (nightly.scheduler_id, nightly.cron, nightly.timezone) == (
        "demo_app-tasks-add", "30 2 * * *", "Europe/Amsterdam",
    )  # fmt: skip
    assert nightly.data == {"args": [1, 2], "kwargs": {}}
    assert nightly.status == ScheduleStatus.ACTIVE
    assert nightly.deadline_at == T0.replace(day=2, hour=1, minute=30)  # 02:30 CET
    scheduler = Scheduler.objects.get(id="demo_app-tasks-add")
    assert (scheduler.kind, scheduler.handler) == ("celery", f"celery:{ADD}")
    quarter = _schedule("weekday quarter")
    assert (quarter.scheduler_id, quarter.cron) == ("reports-demo_app-tasks-add", "*/15 * * * 1-5")
    flaky = _schedule("paused flaky")
    assert (flaky.interval_seconds, flaky.status) == (30, ScheduleStatus.PAUSED)
    two_days = _schedule("every 2 days")
    assert (two_days.interval_seconds, two_days.start_at) == (172800, T0 + timedelta(days=1))
    assert (two_days.run_count, two_days.deadline_at) == (5, T0 + timedelta(days=1))
    at_launch = _schedule("at launch")
    assert (at_launch.run_at, at_launch.deadline_at) == (T0 + timedelta(hours=2),) * 2
    assert _schedule("launched").status == ScheduleStatus.FINISHED  # beat ran it already
    assert _schedule("once at nine").run_at == T0.replace(day=2, hour=9, minute=0)
    assert Schedule.objects.count() == 8


def test_import__a_rerun_updates_and_never_duplicates(seeded: None) -> None:
    import_periodic_tasks()
    before = set(Schedule.objects.values_list("id", flat=True))

    again = import_periodic_tasks()
    assert {o for o in _outcomes(again).values()} == {"unchanged", "not converted", "skipped"}

    CrontabSchedule.objects.filter(hour="2").update(hour="4")
    flaky = PeriodicTask.objects.get(name="paused flaky")
    flaky.enabled = True
    flaky.save()
    third = _outcomes(import_periodic_tasks())

    assert (third["nightly report"], third["paused flaky"], third["at launch"]) == (
        "updated", "updated", "unchanged",
    )  # fmt: skip
    assert set(Schedule.objects.values_list("id", flat=True)) == before
    assert _schedule("nightly report").cron == "30 4 * * *"
    assert _schedule("paused flaky").status == ScheduleStatus.ACTIVE


def test_import__dry_run_changes_nothing_and_says_so(seeded: None) -> None:
    schedulers = Scheduler.objects.count()
    out = StringIO()

    call_command("import_beat", "--dry-run", stdout=out)

    assert Schedule.objects.count() == 0 and Scheduler.objects.count() == schedulers
    text = out.getvalue()
    assert "dry run: nothing changed" in text
    own = len(system_jobs())
    assert (
        f"would convert 8 (8 created, 0 updated, 0 unchanged); not converted 7; skipped {own}"
        in text
    )
    for name in ("nightly report", "at sunrise", "demo_app-tasks-add"):
        assert name in text


def test_import__disable_source_stops_beat_for_what_converted(
    seeded: None, clock: TimeMachineFixture
) -> None:
    changed_before = PeriodicTasks.last_change()
    clock.shift(timedelta(seconds=1))
    out = StringIO()

    call_command("import_beat", "--disable-source", stdout=out)

    enabled = dict(PeriodicTask.objects.values_list("name", "enabled"))
    assert not enabled["nightly report"] and not enabled["with expiry"]
    assert enabled["at sunrise"] and enabled["misfit"]  # not converted: beat keeps them
    assert enabled["scheduler: dispatcher"]  # ours, skipped
    assert PeriodicTasks.last_change() != changed_before  # beat notices
    assert "disabled in beat" in out.getvalue()
    assert _schedule("nightly report").status == ScheduleStatus.ACTIVE


def test_import__paused_imports_everything_paused(seeded: None) -> None:
    import_periodic_tasks(paused=True)

    statuses = set(Schedule.objects.values_list("status", flat=True))
    assert statuses == {ScheduleStatus.PAUSED, ScheduleStatus.FINISHED}
    assert PeriodicTask.objects.get(name="nightly report").enabled  # beat still runs it


def test_scheduler_id_for__slugs_and_long_names() -> None:
    assert scheduler_id_for("proj.tasks.Send", "reports") == "reports-proj-tasks-send"
    long = scheduler_id_for("x" * 80, None)
    assert len(long) == 64 and long.startswith("x" * 55 + "-")
    assert scheduler_id_for("x" * 80, None) == long  # stable: re-runs find it again
