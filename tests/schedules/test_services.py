"""Schedule services and the orchestrator tick: due schedules become tasks, one per occurrence,
never beside an active one, within each queue's room, picked by the weighted policies."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction
from time_machine import TimeMachineFixture

from schedules import services
from schedules.models import Schedule, ScheduleStatus
from tasks import services as task_services
from tasks.exceptions import SchedulerNotFound
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tests.schedules.helpers import (
    HOUR,
    MINUTE,
    T0,
    Make,
    arrange,
    finish_all,
    fresh,
    tasks_of,
    tick,
)

pytestmark = pytest.mark.django_db

S = TaskStatus


# --- schedule_create ---------------------------------------------------------------------------


def test_schedule_create__interval_is_due_now(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = fresh(make_schedule(interval_seconds=300))

    assert (schedule.status, schedule.deadline_at) == (ScheduleStatus.ACTIVE, T0)
    assert (schedule.run_count, schedule.last_run_at) == (0, None)


def test_schedule_create__cron_is_due_at_its_next_occurrence(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = fresh(make_schedule(cron="30 * * * *"))

    assert schedule.deadline_at == T0.replace(minute=30)


def test_schedule_create__start_at_is_respected(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    start = T0 + timedelta(days=2)

    assert fresh(make_schedule(interval_seconds=60, start_at=start)).deadline_at == start
    cron = fresh(make_schedule(cron="0 12 * * *", start_at=start))
    assert cron.deadline_at == start.replace(hour=12, minute=0)


def test_schedule_create__finished_when_nothing_is_left_to_run(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    past = T0 - HOUR

    for fields in [{"interval_seconds": 60, "end_at": past}, {"cron": "* * * * *", "end_at": past}]:
        schedule = fresh(make_schedule(**fields))
        assert (schedule.status, schedule.deadline_at) == (ScheduleStatus.FINISHED, None)
    assert tick() == 0
    assert not Task.objects.exists()


def _in_the_window_after_the_check(monkeypatch: pytest.MonkeyPatch, write: Callable) -> None:
    """Run `write` right after the schedule's own checks pass and before it is saved: what a
    concurrent request may do in that window."""
    check = Schedule.full_clean

    def check_then_write(self: Schedule, *args: Any, **kwargs: Any) -> None:
        check(self, *args, **kwargs)
        monkeypatch.setattr(Schedule, "full_clean", check)
        write(self)

    monkeypatch.setattr(Schedule, "full_clean", check_then_write)


def _same_schedule_saved(schedule: Schedule) -> None:
    twin = Schedule(**{f.attname: getattr(schedule, f.attname) for f in Schedule._meta.fields})
    twin.id = uuid.uuid4()
    Schedule.objects.bulk_create([twin])  # no checks of its own: the other request's were done


@pytest.mark.parametrize("field", ["name", "hash"])
def test_schedule_create__a_name_or_hash_taken_after_the_check_is_an_error_naming_it(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    _in_the_window_after_the_check(monkeypatch, _same_schedule_saved)

    with pytest.raises(ValidationError) as caught:
        services.schedule_create(scheduler_id=scheduler.id, interval_seconds=60, **{field: "x"})

    assert list(caught.value.message_dict) == [field]
    assert Schedule.objects.count() == 1  # the other request's


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("callers_transaction", [False, True], ids=["alone", "in a transaction"])
def test_schedule_create__a_scheduler_deleted_after_the_check_is_not_found_not_a_duplicate(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch, callers_transaction: bool
) -> None:
    _in_the_window_after_the_check(
        monkeypatch, lambda schedule: Scheduler.objects.filter(id=schedule.scheduler_id).delete()
    )

    # In a caller's transaction (the admin's, a beat import's) the deferred foreign key would
    # only fail at that caller's commit, outside the service.
    caller = transaction.atomic() if callers_transaction else contextlib.nullcontext()
    with pytest.raises(SchedulerNotFound), caller:
        services.schedule_create(scheduler_id=scheduler.id, interval_seconds=60, name="x")

    assert not Schedule.objects.exists()


def test_schedule_create__refuses_bad_input_and_saves_nothing(scheduler: Scheduler) -> None:
    with pytest.raises(ValidationError) as caught:
        services.schedule_create(scheduler_id=scheduler.id, cron="61 * * * *")
    assert "cron" in caught.value.message_dict
    with pytest.raises(SchedulerNotFound):
        services.schedule_create(scheduler_id="nope", interval_seconds=60)
    assert not Schedule.objects.exists()


def test_schedule_create__duplicate_hash_in_a_scheduler_names_hash(
    make_scheduler: Callable[..., Scheduler], make_schedule: Make
) -> None:
    make_schedule(hash="org1-dns")
    make_scheduler("other")
    make_schedule(scheduler_id="other", hash="org1-dns")  # another queue: fine

    with pytest.raises(ValidationError) as caught:
        make_schedule(hash="org1-dns")

    assert "hash" in caught.value.message_dict
    assert Schedule.objects.filter(hash="org1-dns").count() == 2


# --- orchestrate: one task per occurrence ------------------------------------------------------


def test_orchestrate__due_schedule_makes_exactly_one_queued_task(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60, data={"org": "acme"}, priority=3, hash="acme")

    assert services.orchestrate() == {"boefje": 1}

    [task] = Task.objects.all()
    assert (task.status, task.schedule_id, task.scheduler_id) == (S.QUEUED, schedule.id, "boefje")
    assert (task.data, task.priority, task.hash) == ({"org": "acme"}, 3, "acme")
    [event] = TaskEvent.objects.filter(task=task)
    assert (event.from_status, event.to_status) == ("", S.QUEUED)
    assert "materialised" in event.note
    schedule = fresh(schedule)
    assert schedule.deadline_at == T0 + MINUTE
    assert (schedule.last_run_at, schedule.run_count) == (T0, 1)


def test_orchestrate__task_hash_is_derived_from_the_id_without_a_hash(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60)

    tick()

    assert Task.objects.get().hash == f"schedule:{schedule.id}"


def test_orchestrate__second_tick_at_the_same_time_makes_nothing(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60)
    assert tick() == 1
    finish_all()  # even with its task done, the occurrence is spent

    assert tick() == 0
    assert len(tasks_of(schedule)) == 1
    assert fresh(schedule).run_count == 1


def test_orchestrate__deadline_moves_to_the_next_occurrence_after_now(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    interval = make_schedule(interval_seconds=60)
    cron = make_schedule(cron="*/15 * * * *")  # due 10:15
    clock.move_to(T0 + timedelta(minutes=12, seconds=5), tick=False)  # 10:17:05, a late tick

    assert tick() == 2

    # The interval keeps its grid (T0 + k·60 s), the cron its clock; missed points are skipped.
    assert fresh(interval).deadline_at == T0 + timedelta(minutes=13)
    assert fresh(cron).deadline_at == T0.replace(minute=30)


def test_orchestrate__waits_while_its_task_is_active_then_coalesces_into_one_run(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60)
    assert tick() == 1
    [task] = tasks_of(schedule)
    clock.move_to(T0 + MINUTE, tick=False)

    assert tick() == 0  # QUEUED
    [popped] = task_services.task_pop(scheduler_id="boefje")
    assert tick() == 0  # DISPATCHED
    task_services.task_start(task_id=popped.id)
    assert tick() == 0  # RUNNING
    assert fresh(schedule).deadline_at == T0 + MINUTE  # waiting, not advanced
    assert fresh(schedule).run_count == 1

    task_services.task_complete(task_id=task.id)
    clock.move_to(T0 + timedelta(minutes=5, seconds=30), tick=False)  # 5 occurrences missed

    assert tick() == 1
    assert tick() == 0
    assert len(tasks_of(schedule)) == 2
    schedule = fresh(schedule)
    assert schedule.deadline_at == T0 + timedelta(minutes=6)
    assert schedule.run_count == 2


def test_orchestrate__a_manual_task_with_the_schedules_hash_blocks_it(
    clock: TimeMachineFixture, make_schedule: Make, push: Callable[..., Task]
) -> None:
    schedule = make_schedule(interval_seconds=60, hash="acme-dns")
    manual = push(hash="acme-dns")

    assert tick() == 0
    assert fresh(schedule).deadline_at == T0
    assert tasks_of(schedule) == []

    task_services.task_pop(scheduler_id="boefje")
    task_services.task_complete(task_id=manual.id)
    assert tick() == 1
    assert tasks_of(schedule)[0].hash == "acme-dns"


def test_orchestrate__a_manual_task_with_a_derived_hash_blocks_only_that_schedule(
    clock: TimeMachineFixture, make_schedule: Make, push: Callable[..., Task]
) -> None:
    blocked = make_schedule(interval_seconds=60)
    others = [make_schedule(interval_seconds=60) for _ in range(3)]
    push(hash=blocked.task_hash)

    assert tick() == 3

    assert tasks_of(blocked) == []
    assert fresh(blocked).deadline_at == T0
    assert fresh(blocked).run_count == 0
    assert all(len(tasks_of(other)) == 1 for other in others)


def test_orchestrate__one_off_runs_once_then_is_finished(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(run_at=T0 + timedelta(minutes=10))
    assert tick() == 0
    clock.move_to(T0 + timedelta(minutes=10), tick=False)

    assert tick() == 1

    schedule = fresh(schedule)
    assert (schedule.status, schedule.deadline_at, schedule.run_count) == ("FINISHED", None, 1)
    finish_all()
    clock.shift(timedelta(days=1))
    assert tick() == 0


def test_orchestrate__finished_once_past_end_at(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60, end_at=T0 + timedelta(seconds=90))
    assert tick() == 1
    assert fresh(schedule).status == ScheduleStatus.ACTIVE
    finish_all()
    clock.move_to(T0 + MINUTE, tick=False)

    assert tick() == 1  # the last occurrence before end_at

    schedule = fresh(schedule)
    assert (schedule.status, schedule.deadline_at) == (ScheduleStatus.FINISHED, None)
    finish_all()
    clock.shift(HOUR)
    assert tick() == 0


def test_orchestrate__paused_scheduler_makes_nothing(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60)
    task_services.scheduler_set_paused(scheduler_id="boefje", paused=True)

    assert services.orchestrate() == {}
    assert fresh(schedule).deadline_at == T0

    task_services.scheduler_set_paused(scheduler_id="boefje", paused=False)
    assert tick() == 1


def test_orchestrate__paused_schedule_makes_nothing(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    paused = make_schedule(interval_seconds=60)
    services.schedule_pause(schedule_id=paused.id)
    other = make_schedule(interval_seconds=60)

    assert tick() == 1
    assert tasks_of(paused) == []
    assert len(tasks_of(other)) == 1
    assert fresh(paused).status == ScheduleStatus.PAUSED


def test_orchestrate__only_the_named_scheduler(
    clock: TimeMachineFixture, make_scheduler: Callable[..., Scheduler], make_schedule: Make
) -> None:
    make_scheduler("other")
    make_schedule(interval_seconds=60)
    make_schedule(scheduler_id="other", interval_seconds=60)

    assert services.orchestrate(scheduler_id="other") == {"other": 1}
    assert list(Task.objects.values_list("scheduler_id", flat=True)) == ["other"]


# --- room and policies -------------------------------------------------------------------------


def _due(scheduler_id: str, make_schedule: Make, rows: list[dict[str, Any]]) -> list[Schedule]:
    schedules = [make_schedule(scheduler_id=scheduler_id, interval_seconds=3600) for _ in rows]
    arrange(schedules, rows)
    return schedules


def _picked(schedules: list[Schedule]) -> list[int]:
    return [i for i, schedule in enumerate(schedules) if tasks_of(schedule)]


@pytest.mark.parametrize(("queued", "made"), [(2, 3), (5, 0)])
def test_orchestrate__fills_only_the_room_of_a_bounded_queue(
    clock: TimeMachineFixture,
    make_scheduler: Callable[..., Scheduler],
    make_schedule: Make,
    queued: int,
    made: int,
) -> None:
    make_scheduler("small", max_queue_size=5)
    for n in range(queued):
        task_services.task_push(scheduler_id="small", data={"n": n})
    schedules = [make_schedule(scheduler_id="small") for _ in range(10)]

    assert tick("small") == made

    assert Task.objects.filter(scheduler_id="small", status=S.QUEUED).count() == queued + made
    assert sum(fresh(s).deadline_at == T0 for s in schedules) == 10 - made  # the rest wait


POLICY_CASES = {
    # Never-run ones first, though the others are more overdue.
    "never_run_first": [
        {"last_run_at": T0 - HOUR, "deadline_at": T0 - 30 * MINUTE},
        {"last_run_at": None, "deadline_at": T0},
        {"last_run_at": T0 - HOUR, "deadline_at": T0 - 20 * MINUTE},
        {"last_run_at": None, "deadline_at": T0},
    ],
    # Lowest priority number first, though the others are more overdue.
    "highest_priority_first": [
        {"priority": 5, "deadline_at": T0 - 30 * MINUTE},
        {"priority": -1, "deadline_at": T0},
        {"priority": 3, "deadline_at": T0 - 20 * MINUTE},
        {"priority": 0, "deadline_at": T0},
    ],
    # Oldest last run first, though the others are more overdue.
    "least_recently_run_first": [
        {"last_run_at": T0 - 1 * HOUR, "deadline_at": T0 - 30 * MINUTE},
        {"last_run_at": T0 - 4 * HOUR, "deadline_at": T0},
        {"last_run_at": T0 - 2 * HOUR, "deadline_at": T0 - 20 * MINUTE},
        {"last_run_at": T0 - 3 * HOUR, "deadline_at": T0},
    ],
    # Oldest deadline first, though the others are never run, urgent and long unrun.
    "most_overdue_first": [
        {"last_run_at": None, "priority": -5, "deadline_at": T0 - 1 * MINUTE},
        {"last_run_at": T0 - HOUR, "deadline_at": T0 - 4 * MINUTE},
        {"last_run_at": None, "priority": -5, "deadline_at": T0 - 2 * MINUTE},
        {"last_run_at": T0 - HOUR, "deadline_at": T0 - 3 * MINUTE},
    ],
}


@pytest.mark.parametrize("policy", sorted(POLICY_CASES))
def test_orchestrate__policy_orders_the_due_schedules(
    clock: TimeMachineFixture,
    make_scheduler: Callable[..., Scheduler],
    make_schedule: Make,
    policy: str,
) -> None:
    make_scheduler("ordered", max_queue_size=2, policy_weights={policy: 1})
    schedules = _due("ordered", make_schedule, POLICY_CASES[policy])

    assert tick("ordered") == 2

    assert _picked(schedules) == [1, 3]


def test_orchestrate__a_policy_that_cannot_fill_its_share_passes_it_on(
    clock: TimeMachineFixture, make_scheduler: Callable[..., Scheduler], make_schedule: Make
) -> None:
    weights = {"never_run_first": 50, "most_overdue_first": 50}
    make_scheduler("shared", max_queue_size=10, policy_weights=weights)
    never_run = _due("shared", make_schedule, [{"deadline_at": T0}] * 2)
    ran = _due(
        "shared",
        make_schedule,
        [{"last_run_at": T0 - HOUR, "deadline_at": T0 - (i + 1) * MINUTE} for i in range(20)],
    )

    assert tick("shared") == 10

    assert _picked(never_run) == [0, 1]
    assert _picked(ran) == list(range(12, 20))  # the 8 most overdue


def test_orchestrate__a_policy_not_weighted_still_gets_the_leftover(
    clock: TimeMachineFixture, make_scheduler: Callable[..., Scheduler], make_schedule: Make
) -> None:
    make_scheduler("narrow", max_queue_size=4, policy_weights={"never_run_first": 1})
    _due("narrow", make_schedule, [{"deadline_at": T0}])
    _due("narrow", make_schedule, [{"last_run_at": T0 - HOUR, "deadline_at": T0}] * 5)

    assert tick("narrow") == 4


def test_orchestrate__batches_until_every_due_schedule_is_done(
    clock: TimeMachineFixture, make_schedule: Make
) -> None:
    schedules = [make_schedule() for _ in range(7)]

    assert tick(batch_size=3) == 7

    assert all(len(tasks_of(s)) == 1 for s in schedules)
    assert tick(batch_size=3) == 0


@pytest.mark.django_db
def test_orchestrate__an_idle_tick_is_one_query(django_assert_num_queries: Any) -> None:
    for n in range(5):
        task_services.scheduler_create(id=f"q{n}")
        services.schedule_create(scheduler_id=f"q{n}", interval_seconds=3600)
    services.orchestrate()  # each made its first task; nothing is due now

    with django_assert_num_queries(1):
        assert services.orchestrate() == {}
