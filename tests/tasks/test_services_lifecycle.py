"""The queue services: cancel, requeue, the lease reaper, pruning, statistics and
scheduler housekeeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import psycopg
import pytest
from django.db import IntegrityError, connection, connections, transaction
from time_machine import TimeMachineFixture

from schedules import services as schedule_services
from tasks import housekeeping, queue, selectors, services
from tasks.exceptions import DuplicateTask, SchedulerNotFound, TransitionRefused
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tests.support.processes import database_url
from tests.support.seed import force_status
from tests.tasks.helpers import (
    T0,
    Push,
    finish,
    fresh,
    history,
    make_running,
    pop_one,
    user_schedulers,
)

S = TaskStatus


# --- cancel ----------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("dispatched", [False, True])
def test_task_cancel__queued_or_dispatched_at_once(push: Push, dispatched: bool) -> None:
    task = push()
    if dispatched:
        pop_one()

    cancelled = services.task_cancel(task_id=task.id, actor="op")

    row = fresh(cancelled)
    assert (row.status, row.lease_expires_at) == (S.CANCELLED, None)
    assert history(task)[-1][:2] == (S.DISPATCHED if dispatched else S.QUEUED, S.CANCELLED)
    with pytest.raises(TransitionRefused):
        services.task_cancel(task_id=task.id)


@pytest.mark.django_db
def test_task_cancel__failed_report_of_a_cancelled_dispatched_task_is_refused(push: Push) -> None:
    task = push()
    pop_one()
    services.task_cancel(task_id=task.id)

    with pytest.raises(TransitionRefused):
        services.task_report(task_id=task.id, status=S.FAILED, attempt=1, error="x")

    assert fresh(task).status == S.CANCELLED, "a runner's report must not revive it"


@pytest.mark.django_db
def test_task_cancel__running_is_cooperative(push: Push, frozen: TimeMachineFixture) -> None:
    task = make_running(push)

    requested = services.task_cancel(task_id=task.id, actor="op")
    again = services.task_cancel(task_id=task.id, actor="op")

    assert requested.status == again.status == S.RUNNING
    assert fresh(task).cancel_requested_at == T0
    assert [e for e in history(task) if e[2] == "cancel requested"] == [
        (S.RUNNING, S.RUNNING, "cancel requested")
    ]


@pytest.mark.django_db
def test_task_cancel__running_then_failed_report_ends_cancelled(push: Push) -> None:
    task = make_running(push)
    services.task_cancel(task_id=task.id)

    ended = services.task_report(task_id=task.id, status=S.FAILED, error="stopped")

    assert ended.status == S.CANCELLED and ended.attempts == 1
    assert services.task_pop(scheduler_id="boefje") == []


@pytest.mark.django_db
def test_task_cancel__running_then_lease_expiry_ends_cancelled(
    push: Push, frozen: TimeMachineFixture
) -> None:
    task = make_running(push)
    services.task_cancel(task_id=task.id)
    frozen.shift(301)

    assert housekeeping.tasks_reap_expired() == 1
    assert fresh(task).status == S.CANCELLED


@pytest.mark.django_db
def test_task_cancel__running_then_completed_stays_completed(push: Push) -> None:
    task = make_running(push)
    services.task_cancel(task_id=task.id)
    assert services.task_report(task_id=task.id, status=S.COMPLETED).status == S.COMPLETED


@pytest.mark.django_db
def test_task_cancel__finished_is_refused(push: Push) -> None:
    task = push()
    pop_one()
    services.task_complete(task_id=task.id)
    with pytest.raises(TransitionRefused):
        services.task_cancel(task_id=task.id)
    assert fresh(task).status == S.COMPLETED


# --- requeue ---------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("end", [S.FAILED, S.DEAD, S.CANCELLED])
def test_task_requeue__gives_a_fresh_start(
    push: Push, frozen: TimeMachineFixture, end: str
) -> None:
    task = finish(push, end)
    frozen.shift(3600)

    requeued = services.task_requeue(task_id=task.id, actor="op")

    row = fresh(requeued)
    assert (row.status, row.attempts, row.error, row.result) == (S.QUEUED, 0, "", None)
    assert (row.cancel_requested_at, row.lease_expires_at, row.worker) == (None, None, "")
    assert row.not_before == T0 + timedelta(hours=1)
    assert history(task)[-1] == (end, S.QUEUED, "requeued")
    assert pop_one().id == task.id


@pytest.mark.django_db
@pytest.mark.parametrize("stage", ["queued", "completed"])
def test_task_requeue__refused_unless_finished_badly(push: Push, stage: str) -> None:
    task = push()
    if stage == "completed":
        pop_one()
        services.task_complete(task_id=task.id)
    with pytest.raises(TransitionRefused):
        services.task_requeue(task_id=task.id)


@pytest.mark.django_db
def test_task_requeue__duplicate_of_an_active_task(push: Push) -> None:
    dead = finish(push, S.DEAD, hash="h")
    active = push(hash="h")

    with pytest.raises(DuplicateTask) as duplicate:
        services.task_requeue(task_id=dead.id)

    assert duplicate.value.existing_id == active.id
    assert fresh(dead).status == S.DEAD
    assert history(dead)[-1][1] == S.DEAD


# --- reaper ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_tasks_reap_expired__retries_a_lost_attempt(push: Push, frozen: TimeMachineFixture) -> None:
    task = push()
    pop_one()
    frozen.shift(300)
    assert housekeeping.tasks_reap_expired() == 0, "a lease is good until it has passed"
    frozen.shift(1)

    assert housekeeping.tasks_reap_expired() == 1

    row = fresh(task)
    assert (row.status, row.error, row.attempts) == (S.QUEUED, "lease expired (lost)", 1)
    assert row.not_before == T0 + timedelta(seconds=311)
    assert TaskEvent.objects.filter(task_id=task.id, actor="reaper").count() == 1


@pytest.mark.django_db
def test_tasks_reap_expired__exhausts_to_dead(
    make_scheduler: Callable[..., Scheduler], frozen: TimeMachineFixture
) -> None:
    make_scheduler("q", max_attempts=1, lease_seconds=60)
    task = services.task_push(scheduler_id="q")
    pop_one("q")
    services.task_start(task_id=task.id)
    frozen.shift(61)

    assert housekeeping.tasks_reap_expired() == 1
    assert fresh(task).status == S.DEAD


@pytest.mark.django_db
def test_tasks_reap_expired__leaves_unexpired_leases(
    push: Push, frozen: TimeMachineFixture
) -> None:
    early = push()
    frozen.shift(1)
    late = push()
    assert pop_one().id == early.id
    frozen.shift(200)
    assert pop_one().id == late.id
    frozen.shift(101)

    assert housekeeping.tasks_reap_expired() == 1
    assert (fresh(early).status, fresh(late).status) == (S.QUEUED, S.DISPATCHED)
    services.task_heartbeat(task_id=late.id)
    frozen.shift(250)
    assert housekeeping.tasks_reap_expired() == 0


@pytest.mark.django_db
def test_tasks_reap_expired__in_batches(push: Push, frozen: TimeMachineFixture) -> None:
    for _ in range(5):
        push()
    services.task_pop(scheduler_id="boefje", limit=5)
    frozen.shift(301)
    assert housekeeping.tasks_reap_expired(batch_size=2) == 5
    assert Task.objects.filter(status=S.QUEUED).count() == 5


# --- prune -----------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_tasks_prune__skips_a_task_someone_holds_and_keeps_its_events(
    push: Push, time_machine: TimeMachineFixture
) -> None:
    # A requeue holds the row while it writes its event; the prune must not delete the task
    # under it (Django's delete goes by id alone, and no constraint guards the events).
    time_machine.move_to(T0, tick=False)
    held, other = finish(push, S.FAILED), finish(push, S.FAILED)
    time_machine.shift(timedelta(days=8))
    holder = psycopg.connect(database_url(connection.settings_dict, "postgresql"))
    try:
        holder.execute("SELECT 1 FROM tasks_task WHERE id = %s FOR UPDATE", [held.id])
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")  # waiting on the holder fails the test
        assert housekeeping.tasks_prune() == 1
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")  # the connection serves the later tests
        holder.rollback()
        holder.close()
    assert set(Task.objects.values_list("id", flat=True)) == {held.id}
    assert TaskEvent.objects.filter(task_id=held.id).exists()
    assert not TaskEvent.objects.filter(task_id=other.id).exists()


def _delete_scheduler_in_a_thread(scheduler_id: str) -> threading.Thread:
    def delete() -> None:
        try:
            services.scheduler_delete(scheduler_id=scheduler_id)
        finally:
            connections.close_all()

    thread = threading.Thread(target=delete)
    thread.start()
    return thread


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_scheduler_delete__an_event_written_meanwhile_goes_with_its_task(push: Push) -> None:
    # A writer (a requeue, a report) has changed a task and written its event, not yet
    # committed, when the queue is deleted. Django deletes the events, then the tasks; without
    # the tasks locked first, the task's delete waited for the writer and the event it
    # committed stayed behind, naming no task (events have no database constraint).
    task = finish(push, S.FAILED)
    holder = psycopg.connect(database_url(connection.settings_dict, "postgresql"))
    holder.execute("UPDATE tasks_task SET modified_at = now() WHERE id = %s", [task.id])
    holder.execute(
        "INSERT INTO tasks_taskevent (task_id, from_status, to_status, at, actor, note) "
        "VALUES (%s, 'FAILED', 'QUEUED', now(), 'writer', 'requeued')",
        [task.id],
    )
    deleting = _delete_scheduler_in_a_thread(task.scheduler_id)
    time.sleep(0.5)  # the delete reaches the writer's row lock and waits
    holder.commit()
    holder.close()
    deleting.join(timeout=30)

    assert not deleting.is_alive()
    assert not Scheduler.objects.filter(id=task.scheduler_id).exists()
    assert not TaskEvent.objects.filter(task_id=task.id).exists(), "an orphan event stayed"


@pytest.mark.django_db
def test_tasks_prune__only_old_finished_tasks(push: Push, frozen: TimeMachineFixture) -> None:
    old = {end: finish(push, end) for end in (S.FAILED, S.DEAD, S.CANCELLED)}
    old[S.COMPLETED] = push()
    pop_one()
    services.task_complete(task_id=old[S.COMPLETED].id)
    queued, running = push(), make_running(push, data={"id": "r"})
    frozen.shift(timedelta(days=6))
    recent = push()
    force_status([recent.id], S.COMPLETED)

    frozen.shift(timedelta(days=1, seconds=1))  # 7 days after the first ones finished
    assert housekeeping.tasks_prune() == 3

    gone = [old[s].id for s in (S.COMPLETED, S.FAILED, S.CANCELLED)]
    assert not Task.objects.filter(id__in=gone).exists()
    assert not TaskEvent.objects.filter(task_id__in=gone).exists()
    kept = {old[S.DEAD].id, queued.id, running.id, recent.id}
    assert set(Task.objects.values_list("id", flat=True)) == kept

    frozen.shift(timedelta(days=23))  # 30 days after
    assert housekeeping.tasks_prune() == 2  # the dead letter and `recent`
    assert set(Task.objects.values_list("id", flat=True)) == {queued.id, running.id}
    assert TaskEvent.objects.filter(task_id=queued.id).exists()


@pytest.mark.django_db
def test_tasks_prune__explicit_ages_and_batches(push: Push, frozen: TimeMachineFixture) -> None:
    for _ in range(5):
        force_status([push().id], S.COMPLETED)
    dead = finish(push, S.DEAD)
    frozen.shift(timedelta(hours=2))
    assert housekeeping.tasks_prune(older_than=timedelta(hours=3)) == 0
    assert housekeeping.tasks_prune(older_than=timedelta(hours=1), batch_size=2) == 5
    assert housekeeping.tasks_prune(dead_older_than=timedelta(hours=1)) == 1
    assert not Task.objects.filter(id=dead.id).exists()


# --- stats and schedulers --------------------------------------------------------------------


@pytest.mark.django_db
def test_hourly_stats__transitions_per_hour(
    push: Push, make_scheduler: Callable[..., Scheduler], frozen: TimeMachineFixture
) -> None:
    make_scheduler("other")
    push(), push()  # 10:05
    services.task_push(scheduler_id="other")
    frozen.move_to(T0 + timedelta(hours=1), tick=False)  # 11:05
    services.task_complete(task_id=pop_one().id)
    frozen.shift(timedelta(minutes=25))  # 11:30

    rows = selectors.hourly_stats(scheduler_id="boefje")

    ten, eleven = T0.replace(minute=0), T0.replace(hour=11, minute=0)
    assert [(r["hour"], r["scheduler"], r["status"], r["count"]) for r in rows] == [
        (ten, "boefje", S.QUEUED, 2),
        (eleven, "boefje", S.COMPLETED, 1),
        (eleven, "boefje", S.DISPATCHED, 1),
    ]
    assert {r["scheduler"] for r in selectors.hourly_stats()} == {"boefje", "other"}
    assert {r["hour"] for r in selectors.hourly_stats(hours=1)} == {eleven}


@pytest.mark.django_db
def test_status_counts__every_status_per_scheduler(push: Push) -> None:
    push(), push()
    pop_one()
    counts = selectors.status_counts()
    assert counts["boefje"] == {**dict.fromkeys(S.values, 0), S.QUEUED: 1, S.DISPATCHED: 1}


@pytest.mark.django_db
def test_scheduler_delete__refused_with_active_tasks(push: Push) -> None:
    task = push()
    with pytest.raises(TransitionRefused) as refused:
        services.scheduler_delete(scheduler_id="boefje")
    assert "1 active" in refused.value.message
    assert Scheduler.objects.filter(id="boefje").exists()

    services.task_cancel(task_id=task.id)
    services.scheduler_delete(scheduler_id="boefje")
    assert not user_schedulers().exists() and not Task.objects.exists()
    with pytest.raises(SchedulerNotFound):
        services.scheduler_delete(scheduler_id="boefje")


@pytest.mark.django_db
def test_scheduler_update__validates(scheduler: Scheduler) -> None:
    from django.core.exceptions import ValidationError

    services.scheduler_update(scheduler=scheduler, max_queue_size=7)
    assert Scheduler.objects.get(id="boefje").max_queue_size == 7
    with pytest.raises(ValidationError):
        services.scheduler_update(scheduler=scheduler, max_attempts=0)
    assert Scheduler.objects.get(id="boefje").max_attempts == 3


@pytest.mark.django_db
def test_task_requeue__while_its_schedule_has_another_active_task_names_that_task(
    push: Push,
) -> None:
    # A schedule's hash may change between its tasks: the requeued task's hash is then free,
    # and what refuses it is the one-active-task-per-schedule index, not a duplicate hash.
    scheduler_id = push().scheduler_id
    schedule = schedule_services.schedule_create(scheduler_id=scheduler_id, interval_seconds=60)
    ended = push(hash="old", extra={"schedule": schedule})
    services.task_cancel(task_id=ended.id)
    active = push(hash="new", extra={"schedule": schedule})

    with pytest.raises(DuplicateTask) as refused:
        services.task_requeue(task_id=ended.id)

    assert refused.value.existing_id == active.id
    assert f"of schedule {schedule.id}" in refused.value.message
    assert fresh(ended).status == S.CANCELLED


@pytest.mark.django_db
def test_active_conflict__names_only_an_active_hash_or_schedule(push: Push) -> None:
    first = push(hash="h")
    violations = {}
    for case, fields in {
        "hash": {"hash": "h"},
        "primary key": {"id": first.id, "hash": "other"},
    }.items():
        row = Task(scheduler_id=first.scheduler_id, **fields)
        with pytest.raises(IntegrityError) as error, transaction.atomic():
            row.save(force_insert=True)
        violations[case] = queue.active_conflict(error.value)

    assert violations == {"hash": queue.ACTIVE_HASH, "primary key": None}
