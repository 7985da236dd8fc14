"""The queue services: push, pop, runner reports and heartbeats."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from time_machine import TimeMachineFixture

from schedules import services as schedule_services
from tasks import housekeeping, services, transitions
from tasks.exceptions import (
    DuplicateTask,
    InvalidRequest,
    QueueFull,
    SchedulerNotFound,
    TaskNotFound,
    TransitionRefused,
)
from tasks.models import RetryPolicy, Scheduler, Task, TaskEvent, TaskStatus
from tasks.retry import RetrySpec
from tests.tasks.helpers import T0, Push, fresh, history, make_running, pop_one

S = TaskStatus


# --- push ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_task_push__defaults_and_pushed_event(push: Push, frozen: TimeMachineFixture) -> None:
    task = push(actor="alice")

    row = fresh(task)
    assert (row.status, row.priority, row.data, row.hash, row.attempts) == (
        S.QUEUED,
        0,
        {},
        None,
        0,
    )
    assert row.not_before == row.created_at == row.modified_at == T0
    assert (row.lease_expires_at, row.result, row.error) == (None, None, "")
    [event] = TaskEvent.objects.filter(task_id=task.id)
    assert (event.from_status, event.to_status, event.note, event.actor) == (
        "",
        S.QUEUED,
        "pushed",
        "alice",
    )


@pytest.mark.django_db
def test_task_push__keeps_data_priority_hash_and_not_before(push: Push) -> None:
    later = datetime(2031, 1, 1, tzinfo=UTC)
    task = push(data={"org": "a"}, priority=-4, hash="h1", not_before=later)
    row = fresh(task)
    assert (row.data, row.priority, row.hash, row.not_before) == ({"org": "a"}, -4, "h1", later)


@pytest.mark.django_db
def test_task_push__empty_hash_is_no_hash(push: Push) -> None:
    first, second = push(hash=""), push(hash="")
    assert fresh(first).hash is None and fresh(second).hash is None


@pytest.mark.django_db
@pytest.mark.parametrize("stage", ["queued", "dispatched", "running"])
def test_task_push__duplicate_active_hash_is_refused(push: Push, stage: str) -> None:
    first = push(hash="h")
    if stage != "queued":
        pop_one()
    if stage == "running":
        services.task_start(task_id=first.id)

    with pytest.raises(DuplicateTask) as duplicate:
        push(hash="h", data={"other": True})

    assert duplicate.value.existing_id == first.id
    assert Task.objects.count() == 1
    assert TaskEvent.objects.filter(note="pushed").count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("final", ["completed", "cancelled", "dead"])
def test_task_push__same_hash_again_after_the_first_finished(push: Push, final: str) -> None:
    first = push(hash="h")
    if final == "cancelled":
        services.task_cancel(task_id=first.id)
    else:
        pop_one()
        if final == "completed":
            services.task_complete(task_id=first.id)
        else:
            services.task_fail(task_id=first.id, retry=RetrySpec(policy="none"))

    second = push(hash="h")

    assert second.id != first.id and fresh(second).status == S.QUEUED


@pytest.mark.django_db
def test_task_push__same_hash_in_another_scheduler(
    push: Push, make_scheduler: Callable[..., Scheduler]
) -> None:
    make_scheduler("other")
    push(hash="h")
    other = push(hash="h", scheduler_id="other")
    assert other.scheduler_id == "other"


@pytest.mark.django_db
def test_task_push__queue_full(make_scheduler: Callable[..., Scheduler]) -> None:
    make_scheduler("small", max_queue_size=2)
    for _ in range(2):
        services.task_push(scheduler_id="small")

    with pytest.raises(QueueFull) as full:
        services.task_push(scheduler_id="small")

    assert "small" in full.value.message and full.value.http_status == 429
    assert Task.objects.filter(scheduler_id="small").count() == 2
    # Only QUEUED tasks fill the queue: once one is handed out there is room again.
    pop_one("small")
    services.task_push(scheduler_id="small")
    with pytest.raises(QueueFull):
        services.task_push(scheduler_id="small")


@pytest.mark.django_db
def test_task_push__max_queue_size_zero_is_unlimited(push: Push, scheduler: Scheduler) -> None:
    assert scheduler.max_queue_size == 0
    for _ in range(30):
        push()
    assert Task.objects.filter(status=S.QUEUED).count() == 30


@pytest.mark.django_db
def test_task_push__unknown_scheduler() -> None:
    with pytest.raises(SchedulerNotFound):
        services.task_push(scheduler_id="nope")
    assert not Task.objects.exists()


@pytest.mark.django_db
def test_task_push__runs_on_queued_hooks_after_commit(
    push: Push, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    seen: list[Scheduler] = []
    monkeypatch.setattr(transitions, "on_queued_hooks", [seen.append])
    with django_capture_on_commit_callbacks(execute=True):
        push()
        assert seen == []
    assert [scheduler.id for scheduler in seen] == ["boefje"]


# A push to an unbounded pull queue on PostgreSQL uses the scheduler row this process read at
# an earlier push (services._PUSH_SCHEDULERS); its statement re-checks the row. Each test
# below pushes once (the row is kept), changes the queue behind that copy, and pushes again.


@pytest.mark.django_db
def test_task_push__a_kept_queue_that_became_bounded_is_bounded(push: Push) -> None:
    push()
    services.scheduler_update(scheduler=Scheduler.objects.get(id="boefje"), max_queue_size=2)
    push()

    with pytest.raises(QueueFull):
        push()
    assert Task.objects.filter(scheduler_id="boefje").count() == 2


@pytest.mark.django_db
def test_task_push__a_kept_queue_that_became_a_celery_queue_checks_the_data(push: Push) -> None:
    push()
    services.scheduler_update(
        scheduler=Scheduler.objects.get(id="boefje"),
        kind="celery",
        handler="celery:demo_app.tasks.add",
        retry_policy="none",
        dead_letter=False,
    )

    with pytest.raises(InvalidRequest) as refused:
        push(data={"args": [1]})
    assert refused.value.field == "data"
    assert Task.objects.filter(scheduler_id="boefje").count() == 1


@pytest.mark.django_db
def test_task_push__a_kept_queue_with_new_flow_keys_stamps_the_new_keys(push: Push) -> None:
    push(data={"org": "a"})
    services.scheduler_update(
        scheduler=Scheduler.objects.get(id="boefje"), concurrency_key="org", concurrency_limit=1
    )

    task = push(data={"org": "b"})

    assert fresh(task).concurrency_value == "b"


@pytest.mark.django_db
def test_task_push__a_kept_queue_that_was_deleted_is_not_found(push: Push) -> None:
    services.task_cancel(task_id=push().id)
    services.scheduler_delete(scheduler_id="boefje")

    with pytest.raises(SchedulerNotFound):
        push()
    assert not Task.objects.filter(scheduler_id="boefje").exists()


# --- pop -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_task_pop__priority_then_created_at(push: Push, frozen: TimeMachineFixture) -> None:
    pushed = []
    for priority in [5, 1, 1, -3, 5]:
        pushed.append(push(priority=priority))
        frozen.shift(1)
    expected = [pushed[3], pushed[1], pushed[2], pushed[0], pushed[4]]

    assert [t.id for t in services.task_pop(scheduler_id="boefje", limit=3)] == [
        t.id for t in expected[:3]
    ]
    assert [pop_one().id for _ in range(2)] == [t.id for t in expected[3:]]
    assert services.task_pop(scheduler_id="boefje") == []


@pytest.mark.django_db
def test_task_pop__marks_dispatched_with_a_lease(push: Push, frozen: TimeMachineFixture) -> None:
    task = push()
    frozen.shift(5)

    popped = pop_one(worker="runner-1")

    row = fresh(task)
    assert popped.id == task.id and popped.status == row.status == S.DISPATCHED
    assert row.attempts == 1
    assert row.lease_expires_at == T0 + timedelta(seconds=5 + 300)
    assert row.worker == "runner-1"
    assert history(task)[-1] == (S.QUEUED, S.DISPATCHED, "popped")


@pytest.mark.django_db
def test_task_pop__not_before_in_the_future_waits(push: Push, frozen: TimeMachineFixture) -> None:
    push(not_before=T0 + timedelta(minutes=5))
    assert services.task_pop(scheduler_id="boefje") == []
    frozen.shift(timedelta(minutes=5))
    assert len(services.task_pop(scheduler_id="boefje")) == 1


@pytest.mark.django_db
def test_task_pop__limit(push: Push) -> None:
    for _ in range(5):
        push()
    assert len(services.task_pop(scheduler_id="boefje", limit=2)) == 2
    assert Task.objects.filter(status=S.QUEUED).count() == 3
    assert len(services.task_pop(scheduler_id="boefje", limit=10)) == 3


@pytest.mark.django_db
@pytest.mark.parametrize("limit", [0, -1, 1001])
def test_task_pop__limit_out_of_bounds(push: Push, limit: int) -> None:
    push()
    with pytest.raises(InvalidRequest) as invalid:
        services.task_pop(scheduler_id="boefje", limit=limit)
    assert invalid.value.field == "limit"
    assert Task.objects.get().status == S.QUEUED


@pytest.mark.django_db
def test_task_pop__each_call_is_one_observation_of_its_schedulers_pop_histogram(
    push: Push,
) -> None:
    # The histogram's child is kept per process (metrics.labelled): it must stay the one the
    # /metrics registry reads.
    def observed() -> float:
        value = REGISTRY.get_sample_value("scheduler_pop_seconds_count", {"scheduler": "boefje"})
        return value or 0.0

    before = observed()
    push()
    services.task_pop(scheduler_id="boefje")
    services.task_pop(scheduler_id="boefje")  # empty: still timed
    assert observed() == before + 2


@pytest.mark.django_db
def test_task_pop__only_its_own_scheduler(
    push: Push, make_scheduler: Callable[..., Scheduler]
) -> None:
    make_scheduler("other")
    push(scheduler_id="other")
    assert services.task_pop(scheduler_id="boefje", limit=10) == []
    with pytest.raises(SchedulerNotFound):
        services.task_pop(scheduler_id="nope")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"org": "a"}, {"a1", "a2"}),
        ({"org": "a", "size": 2}, {"a2"}),
        ({"boefje.id": "dns"}, {"a1", "b1"}),
        ({"boefje.meta.level": 3}, {"b1"}),
        ({"org": ["b", "c"]}, {"b1", "c1"}),
        ({"contains": "x"}, {"c1"}),
        ({"in": "y"}, {"c1"}),
        ({"flag": True}, {"a2"}),
        ({"org": "zzz"}, set()),
    ],
    ids=[
        "equal",
        "two-keys",
        "nested",
        "nested-deep-int",
        "one-of",
        "contains",
        "in",
        "bool",
        "none",
    ],
)
def test_task_pop__data_filters(push: Push, filters: dict[str, Any], expected: set[str]) -> None:
    push(data={"name": "a1", "org": "a", "size": 1, "boefje": {"id": "dns"}})
    push(data={"name": "a2", "org": "a", "size": 2, "flag": True, "boefje": {"id": "whois"}})
    push(data={"name": "b1", "org": "b", "boefje": {"id": "dns", "meta": {"level": 3}}})
    push(data={"name": "c1", "org": "c", "contains": "x", "in": "y", "flag": False})

    popped = services.task_pop(scheduler_id="boefje", limit=10, filters=filters)

    assert {t.data["name"] for t in popped} == expected
    assert Task.objects.filter(status=S.QUEUED).count() == 4 - len(expected)


@pytest.mark.django_db
def test_task_pop__filter_does_not_confuse_string_and_number(push: Push) -> None:
    push(data={"name": "num", "n": 1})
    push(data={"name": "str", "n": "1"})
    assert [t.data["name"] for t in services.task_pop(scheduler_id="boefje", filters={"n": 1})] == [
        "num"
    ]


@pytest.mark.django_db
def test_task_pop__paused_scheduler_gives_nothing(push: Push) -> None:
    task = push()
    services.scheduler_set_paused(scheduler_id="boefje", paused=True)
    assert services.task_pop(scheduler_id="boefje", limit=10) == []
    assert fresh(task).status == S.QUEUED
    services.scheduler_set_paused(scheduler_id="boefje", paused=False)
    assert pop_one().id == task.id


@pytest.mark.django_db
def test_task_pop__every_pop_spends_an_attempt(push: Push, frozen: TimeMachineFixture) -> None:
    task = push()
    assert pop_one().attempts == 1
    services.task_fail(task_id=task.id, error="x")
    frozen.shift(60)
    assert pop_one().attempts == 2


# --- reports ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_task_report__running_renews_the_lease(push: Push, frozen: TimeMachineFixture) -> None:
    task = push()
    pop_one()
    frozen.shift(100)

    started = services.task_report(task_id=task.id, status=S.RUNNING, attempt=1)

    assert started.status == S.RUNNING
    assert started.lease_expires_at == T0 + timedelta(seconds=400)
    assert history(task)[-1] == (S.DISPATCHED, S.RUNNING, "started")


@pytest.mark.django_db
@pytest.mark.parametrize("from_running", [False, True])
def test_task_report__completed(push: Push, from_running: bool) -> None:
    task = push()
    pop_one()
    if from_running:
        services.task_start(task_id=task.id)

    done = services.task_report(task_id=task.id, status=S.COMPLETED, result={"n": 3})

    row = fresh(done)
    assert (row.status, row.result, row.lease_expires_at, row.error) == (
        S.COMPLETED,
        {"n": 3},
        None,
        "",
    )


@pytest.mark.django_db
def test_task_report__failed_is_retried_with_exponential_backoff(
    push: Push, frozen: TimeMachineFixture
) -> None:
    task = push()
    pop_one()
    failed = services.task_report(task_id=task.id, status=S.FAILED, error="boom 1")
    assert failed.status == S.QUEUED
    assert failed.not_before == T0 + timedelta(seconds=10)
    assert (failed.error, failed.lease_expires_at, failed.worker) == ("boom 1", None, "")
    assert services.task_pop(scheduler_id="boefje") == [], "not before the backoff"
    assert history(task)[-1][2].startswith("attempt 1/3 failed: boom 1; retry at")

    frozen.move_to(failed.not_before, tick=False)
    pop_one()
    failed = services.task_report(task_id=task.id, status=S.FAILED, error="boom 2")

    assert failed.status == S.QUEUED
    assert failed.not_before == T0 + timedelta(seconds=10 + 20)


@pytest.mark.django_db
@pytest.mark.parametrize(("dead_letter", "end"), [(True, S.DEAD), (False, S.FAILED)])
def test_task_report__exhausted_attempts(
    make_scheduler: Callable[..., Scheduler], dead_letter: bool, end: str
) -> None:
    make_scheduler("q", max_attempts=2, retry_policy=RetryPolicy.FIXED, retry_delay_seconds=0)
    Scheduler.objects.filter(id="q").update(dead_letter=dead_letter)
    task = services.task_push(scheduler_id="q")
    pop_one("q")
    assert services.task_report(task_id=task.id, status=S.FAILED).status == S.QUEUED
    pop_one("q")

    last = services.task_report(task_id=task.id, status=S.FAILED, error="again")

    assert last.status == end and last.attempts == 2
    assert history(task)[-1][2].endswith("no attempts left")


@pytest.mark.django_db
@pytest.mark.parametrize(("dead_letter", "end"), [(True, S.DEAD), (False, S.FAILED)])
def test_task_report__retry_policy_none_ends_at_once(
    make_scheduler: Callable[..., Scheduler], dead_letter: bool, end: str
) -> None:
    make_scheduler("q", retry_policy=RetryPolicy.NONE, max_attempts=5, dead_letter=dead_letter)
    task = services.task_push(scheduler_id="q")
    pop_one("q")
    assert services.task_report(task_id=task.id, status=S.FAILED).status == end


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.QUEUED, S.DISPATCHED, S.DEAD, S.CANCELLED, "BOGUS"])
def test_task_report__other_statuses_are_invalid(push: Push, status: str) -> None:
    task = push()
    with pytest.raises(InvalidRequest) as invalid:
        services.task_report(task_id=task.id, status=status)
    assert invalid.value.field == "status"
    assert fresh(task).status == S.QUEUED


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.RUNNING, S.COMPLETED, S.FAILED])
def test_task_report__not_leased_is_refused_naming_both_states(push: Push, status: str) -> None:
    task = push()
    with pytest.raises(TransitionRefused) as refused:
        services.task_report(task_id=task.id, status=status)
    assert S.QUEUED in refused.value.message and status in refused.value.message
    assert fresh(task).status == S.QUEUED and len(history(task)) == 1


@pytest.mark.django_db
def test_task_report__unknown_task() -> None:
    with pytest.raises(TaskNotFound):
        services.task_report(task_id=uuid.uuid4(), status=S.COMPLETED)


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.RUNNING, S.COMPLETED, S.FAILED])
def test_task_report__stale_attempt_is_fenced_out(
    push: Push, frozen: TimeMachineFixture, status: str
) -> None:
    task = push()
    pop_one()
    frozen.shift(301)
    assert housekeeping.tasks_reap_expired() == 1  # lost: back to QUEUED, retried at +10 s
    frozen.shift(10)
    assert pop_one().attempts == 2  # handed out again
    before = Task.objects.filter(id=task.id).values().get()
    events = len(history(task))

    with pytest.raises(TransitionRefused) as refused:
        services.task_report(task_id=task.id, status=status, attempt=1, error="late")

    assert "attempt 2, not 1" in refused.value.message
    assert Task.objects.filter(id=task.id).values().get() == before
    assert len(history(task)) == events
    assert services.task_report(task_id=task.id, status=status, attempt=2).status != S.DISPATCHED


# --- heartbeat -------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("running", [False, True])
def test_task_heartbeat__extends_the_lease(
    push: Push, frozen: TimeMachineFixture, running: bool
) -> None:
    task = push()
    pop_one()
    if running:
        services.task_start(task_id=task.id)
    frozen.shift(200)

    beat = services.task_heartbeat(task_id=task.id, attempt=1)
    assert beat.lease_expires_at == T0 + timedelta(seconds=500)
    beat = services.task_heartbeat(task_id=task.id, lease_seconds=30)
    assert fresh(task).lease_expires_at == T0 + timedelta(seconds=230)
    assert beat.status == (S.RUNNING if running else S.DISPATCHED)
    assert len(history(task)) == (3 if running else 2), "a heartbeat is not a transition"


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.QUEUED, S.COMPLETED])
def test_task_heartbeat__refused_without_a_lease(push: Push, status: str) -> None:
    task = push()
    if status == S.COMPLETED:
        pop_one()
        services.task_complete(task_id=task.id)
    with pytest.raises(TransitionRefused) as refused:
        services.task_heartbeat(task_id=task.id)
    assert refused.value.current_status == status
    assert fresh(task).lease_expires_at is None


@pytest.mark.django_db
def test_task_heartbeat__refused_after_cancel_request(push: Push) -> None:
    task = make_running(push)
    lease = fresh(task).lease_expires_at
    services.task_cancel(task_id=task.id)

    with pytest.raises(TransitionRefused) as refused:
        services.task_heartbeat(task_id=task.id)

    assert refused.value.current_status == S.CANCELLED
    assert fresh(task).lease_expires_at == lease


@pytest.mark.django_db
def test_task_heartbeat__stale_attempt_refused(push: Push) -> None:
    task = push()
    pop_one()
    with pytest.raises(TransitionRefused):
        services.task_heartbeat(task_id=task.id, attempt=2)


@pytest.mark.django_db
def test_task_push__a_schedules_second_active_task_names_the_first(push: Push) -> None:
    # Its hash is free (the schedule's hash changed): the one-active-task-per-schedule index
    # refuses it, on the one-statement path (ON CONFLICT) and the ORM path (IntegrityError).
    scheduler_id = push().scheduler_id
    schedule = schedule_services.schedule_create(scheduler_id=scheduler_id, interval_seconds=60)
    first = push(hash="old", extra={"schedule": schedule})

    with pytest.raises(DuplicateTask) as duplicate:
        push(hash="new", extra={"schedule": schedule})

    assert duplicate.value.existing_id == first.id
    assert f"of schedule {schedule.id}" in duplicate.value.message
    assert Task.objects.filter(schedule=schedule).count() == 1
