"""Failure cooldown and auto-pause of schedules (DESIGN 9.4), and schedule expiry: a failed
run (its task FAILED or DEAD) pushes the next deadline out by interval * factor^failures
(capped; a cron schedule to its next occurrence from then), N failures in a row pause the
schedule with a reason, success and an operator's resume start the count afresh; the tasks of
a schedule with expire_seconds expire that long after their occurrence."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from schedules import services
from schedules.beat_import import import_periodic_tasks
from schedules.models import Schedule, ScheduleEvent, ScheduleStatus
from tasks import services as task_services
from tasks.models import Task, TaskStatus
from tasks.retry import RetrySpec
from tests.schedules.helpers import HOUR, T0, Make, fresh, tick

pytestmark = pytest.mark.django_db
S = ScheduleStatus


def _run(schedule: Schedule, *, end: str = TaskStatus.FAILED, **kwargs: Any) -> Task:
    """Tick at the schedule's deadline, pop its task and end it `end` (through the services)."""
    assert tick() == 1
    [task] = task_services.task_pop(scheduler_id=schedule.scheduler_id)
    if end == TaskStatus.COMPLETED:
        return task_services.task_complete(task_id=task.id, result={})
    spec = RetrySpec(policy="none", dead_letter=end == TaskStatus.DEAD)
    return task_services.task_fail(task_id=task.id, error="boom", retry=spec, **kwargs)


def _notes(schedule: Schedule) -> list[tuple[str, str, str]]:
    rows = ScheduleEvent.objects.filter(schedule_id=schedule.id).order_by("at", "id")
    return [(e.from_status, e.to_status, e.note) for e in rows]


# --- cooldown ---------------------------------------------------------------------------------


def test_cooldown__each_failure_multiplies_the_wait(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60, failure_backoff_factor=2)

    _run(schedule)  # at T0
    assert (fresh(schedule).consecutive_failures, fresh(schedule).deadline_at) == (
        1,
        T0 + timedelta(seconds=120),
    )
    clock.move_to(T0 + timedelta(seconds=120), tick=False)
    _run(schedule, end=TaskStatus.DEAD)  # DEAD counts as a failed run too

    assert fresh(schedule).consecutive_failures == 2
    assert fresh(schedule).deadline_at == T0 + timedelta(seconds=120 + 60 * 4)
    assert _notes(schedule)[-1][:2] == (S.ACTIVE, S.ACTIVE)
    assert "failed run 2 in a row: cooldown until" in _notes(schedule)[-1][2]


def test_cooldown__is_capped(clock: TimeMachineFixture, make_schedule: Make) -> None:
    schedule = make_schedule(
        interval_seconds=60, failure_backoff_factor=10, failure_backoff_max_seconds=300
    )
    _run(schedule)
    assert fresh(schedule).deadline_at == T0 + timedelta(seconds=300)  # not 600


def test_cooldown__a_cron_schedule_waits_for_its_occurrence_after_the_cap(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    clock.move_to(T0.replace(hour=11, minute=0), tick=False)
    schedule = make_schedule(
        cron="0 * * * *", failure_backoff_factor=3, failure_backoff_max_seconds=5400
    )

    _run(schedule)  # 11:00; hourly * 3 = 3 h, capped at 1.5 h: 12:30 -> the 13:00 occurrence

    assert fresh(schedule).deadline_at == T0.replace(hour=13, minute=0)


def test_cooldown__a_retried_attempt_is_not_a_failed_run(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60, failure_backoff_factor=2)
    assert tick() == 1
    [task] = task_services.task_pop(scheduler_id="boefje")

    retried = task_services.task_fail(task_id=task.id, error="flaky")

    assert retried.status == TaskStatus.QUEUED
    assert fresh(schedule).consecutive_failures == 0
    assert fresh(schedule).deadline_at == T0 + timedelta(seconds=60)


def test_success__resets_the_count(
    clock: TimeMachineFixture,
    make_schedule: Make,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    schedule = make_schedule(interval_seconds=60, failure_backoff_factor=2)
    _run(schedule)
    clock.move_to(fresh(schedule).deadline_at, tick=False)

    with django_capture_on_commit_callbacks(execute=True):
        _run(schedule, end=TaskStatus.COMPLETED)

    assert fresh(schedule).consecutive_failures == 0


# --- auto-pause -------------------------------------------------------------------------------


def test_max_consecutive_failures__pauses_with_a_reason_and_resume_clears_it(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60, max_consecutive_failures=2)
    _run(schedule)
    assert fresh(schedule).status == S.ACTIVE
    clock.move_to(T0 + timedelta(seconds=60), tick=False)

    task = _run(schedule, end=TaskStatus.DEAD)

    paused = fresh(schedule)
    assert (paused.status, paused.consecutive_failures, paused.deadline_at) == (S.PAUSED, 2, None)
    assert paused.paused_reason.startswith("2 failed runs in a row (max_consecutive_failures")
    assert f"task {task.id} DEAD: boom" in paused.paused_reason
    assert _notes(schedule)[-1] == (S.ACTIVE, S.PAUSED, paused.paused_reason)
    clock.move_to(T0 + HOUR, tick=False)
    assert tick() == 0  # paused: nothing runs

    resumed = services.schedule_resume(schedule_id=schedule.id, actor="op")

    assert (resumed.status, resumed.consecutive_failures, resumed.paused_reason) == (
        S.ACTIVE,
        0,
        "",
    )


def test_max_consecutive_failures__a_cancelled_run_is_not_a_failure(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60, max_consecutive_failures=1)
    assert tick() == 1
    [task] = task_services.task_pop(scheduler_id="boefje")

    task_services.task_cancel(task_id=task.id)

    assert (fresh(schedule).status, fresh(schedule).consecutive_failures) == (S.ACTIVE, 0)


def test_schedule_pause__by_an_operator_says_who(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule()
    assert services.schedule_pause(schedule_id=schedule.id, actor="alice").paused_reason == (
        "paused by alice"
    )


# --- expire_seconds -----------------------------------------------------------------------------


def test_expire_seconds__counted_from_the_occurrence_on_tick_and_from_now_on_trigger(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=600, expire_seconds=30)
    clock.move_to(T0 + timedelta(seconds=5), tick=False)  # ticked 5 s after its occurrence

    assert tick() == 1
    ticked = Task.objects.get(schedule_id=schedule.id)
    assert ticked.expires_at == T0 + timedelta(seconds=30)
    task_services.task_cancel(task_id=ticked.id)

    triggered = services.schedule_trigger(schedule_id=schedule.id)
    assert triggered.expires_at == T0 + timedelta(seconds=35)


def test_expire_seconds__unset_tasks_never_expire(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    make_schedule(interval_seconds=60)
    assert tick() == 1
    assert Task.objects.get().expires_at is None


# --- API, CLI, admin, dashboard -----------------------------------------------------------------


def test_schedules_api__flow_fields_are_set_validated_and_shown(
    clock: TimeMachineFixture, scheduler: Any, operator_client: APIClient
) -> None:
    body = {
        "scheduler": "boefje",
        "interval_seconds": 60,
        "expire_seconds": 30,
        "failure_backoff_factor": 2.0,
        "failure_backoff_max_seconds": 3600,
        "max_consecutive_failures": 3,
    }
    created = operator_client.post("/api/schedules/", body, "json")
    assert created.status_code == 201, created.json()
    shown = created.json()
    assert {k: shown[k] for k in body if k != "scheduler"} == {
        k: v for k, v in body.items() if k != "scheduler"
    }
    assert (shown["consecutive_failures"], shown["paused_reason"]) == (0, "")

    for field, value in [
        ("failure_backoff_factor", 0.5),
        ("max_consecutive_failures", 0),
        ("expire_seconds", 0),
        ("failure_backoff_max_seconds", -1),
    ]:
        bad = operator_client.post("/api/schedules/", {**body, field: value}, "json")
        assert bad.status_code == 400 and field in bad.json(), (field, bad.json())
    assert Schedule.objects.count() == 1


def test_schedules_api__failing_filter(
    clock: TimeMachineFixture, make_schedule: Make, operator_client: APIClient
) -> None:
    failing = make_schedule(interval_seconds=60, failure_backoff_factor=2)
    _run(failing)
    make_schedule(interval_seconds=60, name="fine")

    listed = operator_client.get("/api/schedules/", {"failing": "true"}).json()["results"]

    assert [s["id"] for s in listed] == [str(failing.id)]


def test_schedule_command__create_with_flow_options_and_list_shows_the_reason(
    clock: TimeMachineFixture, scheduler: Any
) -> None:
    call_command(
        "schedule", "create", "--scheduler", "boefje", "--interval-seconds", "60",
        "--expire-seconds", "30", "--failure-backoff-factor", "2",
        "--failure-backoff-max-seconds", "600", "--max-consecutive-failures", "1",
    )  # fmt: skip
    schedule = Schedule.objects.get()
    assert (schedule.expire_seconds, schedule.failure_backoff_factor) == (30, 2.0)
    assert (schedule.failure_backoff_max_seconds, schedule.max_consecutive_failures) == (600, 1)
    _run(schedule)

    out = StringIO()
    call_command("schedule", "list", stdout=out)

    [row] = [line for line in out.getvalue().splitlines() if str(schedule.id) in line]
    assert "why paused" in out.getvalue() and "1 failed run in a row" in row


@pytest.fixture
def admin_client(clock: TimeMachineFixture) -> Client:
    user = User.objects.create_superuser("root", "root@example.org", "pw-not-used")
    client = Client()
    client.force_login(user)
    return client


def test_admin_and_dashboard__show_why_a_schedule_was_paused(
    admin_client: Client, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60, max_consecutive_failures=1)
    _run(schedule)

    listing = admin_client.get("/admin/schedules/schedule/").content.decode()
    change = admin_client.get(f"/admin/schedules/schedule/{schedule.id}/change/").content.decode()
    panel = admin_client.get("/", {"panel": "schedules"}).content.decode()

    assert "1 failed run in a row" in listing and "Failures in a row" in listing
    assert "1 failed run in a row" in change and 'name="max_consecutive_failures"' in change
    assert "paused by failures<b>1</b>" in panel and "1 failed run in a row" in panel


# --- import_beat ------------------------------------------------------------------------------


def test_import_beat__expire_seconds_and_expires_carry_over(clock: TimeMachineFixture) -> None:
    every = IntervalSchedule.objects.create(every=60, period="seconds")
    args = json.dumps([1, 1])
    PeriodicTask.objects.create(
        name="short-lived", task="demo_app.tasks.add", interval=every, args=args, expire_seconds=30
    )
    PeriodicTask.objects.create(
        name="until noon", task="demo_app.tasks.add", interval=every, args=args,
        expires=T0.replace(hour=12, minute=0),
    )  # fmt: skip

    rows = {row.name: row for row in import_periodic_tasks()}

    assert Schedule.objects.get(name="short-lived").expire_seconds == 30
    assert Schedule.objects.get(name="until noon").end_at == T0.replace(hour=12, minute=0)
    assert "the schedule ends then (end_at)" in " ".join(rows["until noon"].notes)
    assert not any("expire" in note for note in rows["short-lived"].notes)
