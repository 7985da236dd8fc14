"""Schedule lifecycle services: resume and edit recompute the deadline from now (no burst),
trigger runs now beside the timetable, adaptive intervals follow results, delete keeps tasks."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from time_machine import TimeMachineFixture

from schedules import services
from schedules.exceptions import ScheduleNotFound, ScheduleStateError
from schedules.models import Schedule, ScheduleStatus
from tasks import services as task_services
from tasks.exceptions import DuplicateTask
from tasks.models import Task, TaskStatus
from tests.schedules.helpers import HOUR, MINUTE, T0, Make, finish_all, fresh, tasks_of, tick

pytestmark = pytest.mark.django_db

S = TaskStatus


# --- resume and edit: recomputed from now, no burst --------------------------------------------


def test_schedule_resume__interval_after_downtime_waits_for_its_next_occurrence(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=3600)
    assert tick() == 1
    finish_all()
    clock.move_to(T0 + timedelta(minutes=10), tick=False)
    services.schedule_pause(schedule_id=schedule.id)
    clock.move_to(T0 + timedelta(hours=5, minutes=10), tick=False)

    resumed = services.schedule_resume(schedule_id=schedule.id)

    assert resumed.status == ScheduleStatus.ACTIVE
    assert resumed.deadline_at == T0 + timedelta(hours=6)
    assert tick() == 0
    clock.move_to(T0 + timedelta(hours=6), tick=False)
    assert tick() == 1


@pytest.mark.parametrize(
    ("resumed_at", "deadline", "made"),
    [
        (T0.replace(hour=15, minute=30), T0.replace(hour=16, minute=0), 0),
        (T0.replace(hour=16, minute=0), T0.replace(hour=16, minute=0), 1),  # due exactly now
    ],
)
def test_schedule_resume__cron_after_downtime_fires_only_when_due(
    clock: TimeMachineFixture,
    make_schedule: Make,
    resumed_at: datetime,
    deadline: datetime,
    made: int,
) -> None:
    schedule = make_schedule(cron="0 * * * *")
    services.schedule_pause(schedule_id=schedule.id)
    assert fresh(schedule).deadline_at is None
    clock.move_to(resumed_at, tick=False)

    resumed = services.schedule_resume(schedule_id=schedule.id)

    assert resumed.deadline_at == deadline
    assert tick() == made


def test_schedule_resume__a_finished_one_off_stays_finished(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(run_at=T0)
    assert tick() == 1
    with pytest.raises(ScheduleStateError):
        services.schedule_pause(schedule_id=schedule.id)  # FINISHED -> PAUSED is refused
    assert fresh(schedule).status == ScheduleStatus.FINISHED

    assert services.schedule_resume(schedule_id=schedule.id).status == ScheduleStatus.FINISHED
    assert tick() == 0


def test_schedule_update__cron_edit_recomputes_the_deadline_from_now(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *")  # due 11:00
    clock.move_to(T0 + timedelta(minutes=5), tick=False)  # 10:10

    edited = services.schedule_update(schedule_id=schedule.id, cron="30 * * * *")

    assert fresh(edited).deadline_at == T0.replace(minute=30)
    assert tick() == 0


@pytest.mark.parametrize(
    ("new_interval", "deadline"),
    [
        (60, T0 + MINUTE),  # shorter: no need to wait out the old hour
        (7200, T0 + 2 * HOUR),  # longer: not at the old, nearer time
    ],
)
def test_schedule_update__interval_edit_recomputes_the_deadline_from_now(
    clock: TimeMachineFixture, make_schedule: Make, new_interval: int, deadline: datetime
) -> None:
    schedule = make_schedule(interval_seconds=3600)
    assert tick() == 1  # ran at T0, next at T0 + 1 h
    finish_all()
    clock.move_to(T0 + timedelta(seconds=30), tick=False)

    services.schedule_update(schedule_id=schedule.id, interval_seconds=new_interval)

    assert fresh(schedule).deadline_at == deadline
    assert tick() == 0


def test_schedule_update__paused_schedule_stays_paused(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60)
    services.schedule_pause(schedule_id=schedule.id)

    services.schedule_update(schedule_id=schedule.id, interval_seconds=120, priority=4)

    schedule = fresh(schedule)
    assert (schedule.status, schedule.interval_seconds, schedule.priority) == ("PAUSED", 120, 4)
    assert tick() == 0


def test_schedule_update__invalid_edit_changes_nothing(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *")

    with pytest.raises(ValidationError) as caught:
        services.schedule_update(schedule_id=schedule.id, interval_seconds=60)

    assert "cron" in caught.value.message_dict
    assert fresh(schedule).interval_seconds is None
    with pytest.raises(ScheduleNotFound):
        services.schedule_update(schedule_id=uuid.uuid4(), priority=1)


# --- trigger -----------------------------------------------------------------------------------


def test_schedule_trigger__makes_a_task_now_and_leaves_the_deadline(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *", data={"org": "acme"}, priority=2)

    task = services.schedule_trigger(schedule_id=schedule.id, actor="op")

    assert (task.status, task.schedule_id, task.data, task.priority) == (
        S.QUEUED,
        schedule.id,
        {"org": "acme"},
        2,
    )
    assert task.hash == schedule.task_hash
    schedule = fresh(schedule)
    assert (schedule.run_count, schedule.last_run_at) == (1, T0)
    assert schedule.deadline_at == T0.replace(hour=11, minute=0)


def test_schedule_trigger__refused_while_a_task_is_active(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *")
    task = services.schedule_trigger(schedule_id=schedule.id)

    with pytest.raises(DuplicateTask) as caught:
        services.schedule_trigger(schedule_id=schedule.id)

    assert caught.value.existing_id == task.id
    assert fresh(schedule).run_count == 1
    clock.move_to(T0.replace(hour=11, minute=0), tick=False)
    assert tick() == 0  # the triggered task holds the slot
    finish_all()
    assert tick() == 1
    assert len(tasks_of(schedule)) == 2
    with pytest.raises(ScheduleNotFound):
        services.schedule_trigger(schedule_id=uuid.uuid4())


# --- adaptive interval -------------------------------------------------------------------------


def _run_once(
    clock: TimeMachineFixture, schedule: Schedule, result: Any, capture: Callable[..., Any]
) -> Schedule:
    """Tick at the schedule's deadline, then complete its task with `result` (hooks run)."""
    clock.move_to(fresh(schedule).deadline_at, tick=False)
    assert tick() == 1
    [task] = task_services.task_pop(scheduler_id=schedule.scheduler_id)
    with capture(execute=True):
        task_services.task_complete(task_id=task.id, result=result)
    return fresh(schedule)


def test_adaptive_interval__uneventful_runs_grow_it_up_to_max(
    clock: TimeMachineFixture,
    make_schedule: Make,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    schedule = make_schedule(
        interval_seconds=100, min_interval_seconds=50, max_interval_seconds=300, backoff_factor=2
    )
    seen = []
    for _ in range(3):
        schedule = _run_once(
            clock, schedule, {"changed": False}, django_capture_on_commit_callbacks
        )
        seen.append((schedule.interval_seconds, schedule.deadline_at - schedule.last_run_at))

    assert seen == [
        (200, timedelta(seconds=200)),
        (300, timedelta(seconds=300)),
        (300, timedelta(seconds=300)),
    ]


def test_adaptive_interval__eventful_runs_shrink_it_down_to_min(
    clock: TimeMachineFixture,
    make_schedule: Make,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    schedule = make_schedule(
        interval_seconds=400, min_interval_seconds=150, max_interval_seconds=800, backoff_factor=2
    )
    seen = []
    for _ in range(3):
        schedule = _run_once(clock, schedule, {"changed": True}, django_capture_on_commit_callbacks)
        seen.append(schedule.interval_seconds)

    assert seen == [200, 150, 150]
    assert schedule.deadline_at == schedule.last_run_at + timedelta(seconds=150)


@pytest.mark.parametrize("result", [{"found": 3}, None, {"changed": "yes"}, [1, 2]])
def test_adaptive_interval__a_result_without_changed_leaves_it(
    clock: TimeMachineFixture,
    make_schedule: Make,
    django_capture_on_commit_callbacks: Callable[..., Any],
    result: Any,
) -> None:
    schedule = make_schedule(
        interval_seconds=100, min_interval_seconds=50, max_interval_seconds=300, backoff_factor=2
    )

    schedule = _run_once(clock, schedule, result, django_capture_on_commit_callbacks)

    assert schedule.interval_seconds == 100
    assert schedule.deadline_at == T0 + timedelta(seconds=100)


def test_adaptive_interval__not_adaptive_schedules_are_left_alone(
    clock: TimeMachineFixture,
    make_schedule: Make,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    schedule = make_schedule(interval_seconds=100)

    schedule = _run_once(clock, schedule, {"changed": False}, django_capture_on_commit_callbacks)

    assert schedule.interval_seconds == 100


# --- delete, pause ------------------------------------------------------------------------------


def test_schedule_delete__keeps_its_tasks(clock: TimeMachineFixture, make_schedule: Make) -> None:
    schedule = make_schedule(interval_seconds=60)
    tick()
    finish_all()
    clock.shift(MINUTE)
    tick()
    ids = {task.id for task in tasks_of(schedule)}

    services.schedule_delete(schedule_id=schedule.id)

    assert not Schedule.objects.filter(id=schedule.id).exists()
    assert set(Task.objects.values_list("id", flat=True)) == ids
    assert len(ids) == 2
    assert not Task.objects.filter(schedule__isnull=False).exists()
    with pytest.raises(ScheduleNotFound):
        services.schedule_delete(schedule_id=schedule.id)


def test_schedule_pause__clears_the_deadline_and_is_idempotent(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60)

    paused = services.schedule_pause(schedule_id=schedule.id)
    again = services.schedule_pause(schedule_id=schedule.id)

    assert (paused.status, paused.deadline_at) == (ScheduleStatus.PAUSED, None)
    assert again.status == ScheduleStatus.PAUSED
    assert services.schedule_resume(schedule_id=schedule.id).deadline_at == T0
