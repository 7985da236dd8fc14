"""The task state machine: the one table of allowed transitions, enforced by a compare-and-swap
that writes exactly one TaskEvent per change, and the partial unique index behind dedup."""

from __future__ import annotations

from collections.abc import Callable
from itertools import product
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from pilots.models import ComputeElementEvent, PilotEvent
from schedules.models import ScheduleEvent
from tasks import services
from tasks.exceptions import TransitionRefused
from tasks.leases import LeaseProof
from tasks.models import (
    ACTIVE_STATUSES,
    ALLOWED_TRANSITIONS,
    FINAL_STATUSES,
    Scheduler,
    StatusEvent,
    Task,
    TaskEvent,
    TaskStatus,
    is_allowed_transition,
)
from tests.support.plans import analyzed_before_a_burst
from tests.support.seed import force_status

S = TaskStatus
ALLOWED_PAIRS = sorted(
    (src, dst) for src, targets in ALLOWED_TRANSITIONS.items() for dst in targets
)
REFUSED_PAIRS = sorted(
    (src, dst) for src, dst in product(S.values, S.values) if not is_allowed_transition(src, dst)
)
# Named by the brief: these must stay refused whatever else the table grows.
REQUIRED_REFUSALS = [
    *((S.COMPLETED, dst) for dst in S.values),
    (S.QUEUED, S.QUEUED),
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.COMPLETED),
    (S.QUEUED, S.FAILED),
    (S.QUEUED, S.DEAD),
    (S.FAILED, S.RUNNING),
    (S.FAILED, S.COMPLETED),
    (S.FAILED, S.DISPATCHED),
    (S.DEAD, S.DISPATCHED),
    (S.DEAD, S.RUNNING),
    (S.DEAD, S.FAILED),
    (S.CANCELLED, S.RUNNING),
    (S.CANCELLED, S.DISPATCHED),
    (S.CANCELLED, S.COMPLETED),
    (S.RUNNING, S.DISPATCHED),
    (S.RUNNING, S.RUNNING),
    (S.DISPATCHED, S.DISPATCHED),
]


def _pair_id(pair: tuple[str, str]) -> str:
    return f"{pair[0]}->{pair[1]}"


@pytest.fixture
def task_in(push: Callable[..., Task]) -> Callable[[str], Task]:
    """A pushed task put straight into `status` (arrangement only; the code under test is
    `services.transition`)."""

    def make(status: str) -> Task:
        task = push(data={"n": 1}, hash=None)
        force_status([task.id], status)
        return Task.objects.select_related("scheduler").get(id=task.id)

    return make


def _events(task: Task) -> list[TaskEvent]:
    return list(TaskEvent.objects.filter(task_id=task.id).order_by("id"))


def test_transition_table__covers_every_status() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(S.values)
    for targets in ALLOWED_TRANSITIONS.values():
        assert targets <= set(S.values)


def test_transition_table__matches_the_brief() -> None:
    assert ALLOWED_TRANSITIONS[S.COMPLETED] == frozenset()
    for final in (S.FAILED, S.DEAD, S.CANCELLED, S.EXPIRED):
        assert ALLOWED_TRANSITIONS[final] == {S.QUEUED}, "only an operator's requeue"
    # Every non-final state can be cancelled; nothing runs without being handed out first.
    for active in ACTIVE_STATUSES:
        assert S.CANCELLED in ALLOWED_TRANSITIONS[active]
    # EXPIRED (DESIGN 9.4): only a task never handed out expires.
    assert ALLOWED_TRANSITIONS[S.QUEUED] == {S.DISPATCHED, S.CANCELLED, S.EXPIRED}
    assert {S.COMPLETED, S.FAILED, S.DEAD, S.QUEUED} <= ALLOWED_TRANSITIONS[S.RUNNING]
    assert S.RUNNING in ALLOWED_TRANSITIONS[S.DISPATCHED]


@pytest.mark.parametrize("pair", REQUIRED_REFUSALS, ids=_pair_id)
def test_transition_table__required_refusals_are_not_allowed(pair: tuple[str, str]) -> None:
    assert not is_allowed_transition(*pair)


@pytest.mark.django_db
@pytest.mark.parametrize("pair", ALLOWED_PAIRS, ids=_pair_id)
def test_transition__applies_every_allowed_pair(
    pair: tuple[str, str], task_in: Callable[[str], Task]
) -> None:
    from_status, to_status = pair
    task = task_in(from_status)
    before = TaskEvent.objects.filter(task_id=task.id).count()

    updated = services.transition(task, to_status=to_status, actor="tester", note="by hand")

    assert updated.id == task.id
    assert updated.status == to_status
    assert Task.objects.get(id=task.id).status == to_status
    new_events = _events(task)[before:]
    assert len(new_events) == 1
    assert (new_events[0].from_status, new_events[0].to_status) == (from_status, to_status)
    assert (new_events[0].actor, new_events[0].note) == ("tester", "by hand")


@pytest.mark.django_db
@pytest.mark.parametrize("pair", REFUSED_PAIRS, ids=_pair_id)
def test_transition__refuses_every_other_pair_and_changes_nothing(
    pair: tuple[str, str], task_in: Callable[[str], Task]
) -> None:
    from_status, to_status = pair
    task = task_in(from_status)
    before_events = TaskEvent.objects.filter(task_id=task.id).count()
    before_row = Task.objects.filter(id=task.id).values().get()

    with pytest.raises(TransitionRefused) as refused:
        services.transition(task, to_status=to_status, actor="tester")

    assert from_status in refused.value.message and to_status in refused.value.message
    assert refused.value.current_status == from_status
    assert Task.objects.filter(id=task.id).values().get() == before_row
    assert TaskEvent.objects.filter(task_id=task.id).count() == before_events


@pytest.mark.django_db
def test_transition__writes_values_in_the_same_update(task_in: Callable[[str], Task]) -> None:
    task = task_in(S.RUNNING)

    services.transition(
        task, to_status=S.COMPLETED, actor="w", values={"result": {"ok": True}, "error": ""}
    )

    row = Task.objects.get(id=task.id)
    assert row.result == {"ok": True}
    assert row.modified_at > task.modified_at


@pytest.mark.django_db
@pytest.mark.parametrize("changed_to", [S.DISPATCHED, S.CANCELLED])
def test_transition__stale_copy_is_refused(changed_to: str, task_in: Callable[[str], Task]) -> None:
    stale = task_in(S.QUEUED)
    before_events = TaskEvent.objects.filter(task_id=stale.id).count()
    # Someone else moves the row on behind the back of our copy.
    force_status([stale.id], changed_to)

    with pytest.raises(TransitionRefused) as refused:
        services.transition(stale, to_status=S.DISPATCHED, actor="late")

    assert refused.value.current_status == changed_to
    assert Task.objects.get(id=stale.id).status == changed_to
    assert TaskEvent.objects.filter(task_id=stale.id).count() == before_events


@pytest.mark.django_db
def test_transition__attempt_fence_refuses_a_stale_attempt(task_in: Callable[[str], Task]) -> None:
    stale = task_in(S.DISPATCHED)
    Task.objects.filter(id=stale.id).update(attempts=stale.attempts + 1)

    with pytest.raises(TransitionRefused):
        services.transition(stale, to_status=S.RUNNING, actor="old", fence_attempts=True)

    assert Task.objects.get(id=stale.id).status == S.DISPATCHED
    # Without the fence the status alone decides.
    services.transition(stale, to_status=S.RUNNING, actor="old")
    assert Task.objects.get(id=stale.id).status == S.RUNNING


@pytest.mark.django_db
def test_transition__deleted_task_is_refused(task_in: Callable[[str], Task]) -> None:
    task = task_in(S.QUEUED)
    Task.objects.filter(id=task.id).delete()

    with pytest.raises(TransitionRefused) as refused:
        services.transition(task, to_status=S.DISPATCHED, actor="x")

    assert "gone" in refused.value.message


@pytest.mark.django_db
def test_task_event__no_database_constraint_yet_deleting_a_task_deletes_its_events(
    task_in: Callable[[str], Task],
) -> None:
    # The events' foreign key has no constraint in the database (its check cost a lookup and a
    # row lock of the task per event); the ORM's on_delete still takes a task's events with it.
    task, other = task_in(S.QUEUED), task_in(S.QUEUED)
    services.transition(task, to_status=S.DISPATCHED, actor="x")
    assert TaskEvent.objects.filter(task_id=task.id).count() == 2
    [field] = [f for f in TaskEvent._meta.concrete_fields if f.name == "task"]
    assert field.db_constraint is False

    Task.objects.filter(id=task.id).delete()

    assert not TaskEvent.objects.filter(task_id=task.id).exists()
    assert TaskEvent.objects.filter(task_id=other.id).count() == 1


@pytest.mark.django_db
def test_task__is_active_and_can_transition_to(task_in: Callable[[str], Task]) -> None:
    for status in S.values:
        task = task_in(status)
        assert task.is_active == (status in ACTIVE_STATUSES)
        assert task.is_active != (status in FINAL_STATUSES)
        assert task.can_transition_to(S.QUEUED) == (status != S.QUEUED and status != S.COMPLETED)


@pytest.mark.django_db
@pytest.mark.parametrize("active", sorted(ACTIVE_STATUSES))
def test_task_hash_index__one_active_task_per_scheduler_and_hash(
    active: str, scheduler: Scheduler
) -> None:
    Task.objects.create(scheduler=scheduler, hash="h", status=active)

    with pytest.raises(IntegrityError), transaction.atomic():
        Task.objects.create(scheduler=scheduler, hash="h", status=S.QUEUED)


@pytest.mark.django_db
def test_task_hash_index__ignores_finished_tasks_null_hashes_and_other_schedulers(
    scheduler: Scheduler, make_scheduler: Callable[..., Scheduler]
) -> None:
    other = make_scheduler("other")
    for final in FINAL_STATUSES:
        Task.objects.create(scheduler=scheduler, hash="h", status=final)
    Task.objects.create(scheduler=scheduler, hash="h", status=S.QUEUED)
    Task.objects.create(scheduler=other, hash="h", status=S.QUEUED)
    Task.objects.create(scheduler=scheduler, hash=None)
    Task.objects.create(scheduler=scheduler, hash=None)

    assert Task.objects.filter(hash="h").count() == len(FINAL_STATUSES) + 2


@pytest.mark.django_db
def test_scheduler_id__validator_refuses_bad_slugs(make_scheduler: Callable[..., Any]) -> None:
    from django.core.exceptions import ValidationError

    for bad in ["Upper", "has space", "-lead", "", "x" * 65, "dot.ted"]:
        with pytest.raises(ValidationError):
            make_scheduler(bad)
    assert make_scheduler("ok_id-1").id == "ok_id-1"


# --- the state machine on the model ---------------------------------------------------------


@pytest.mark.django_db
def test_task_methods__walk_the_state_machine_through_the_writer(
    push: Callable[..., Task],
) -> None:
    task = push()
    [popped] = services.task_pop(scheduler_id="boefje")
    proof = LeaseProof.holder(popped.lease_token)

    running = popped.start(actor="r1", proof=proof)
    done = running.complete({"ok": True}, actor="r1", proof=proof)

    assert (running.status, done.status, done.result) == (S.RUNNING, S.COMPLETED, {"ok": True})
    steps = list(task.events.values_list("from_status", "to_status", "actor"))
    assert steps[-2:] == [(S.DISPATCHED, S.RUNNING, "r1"), (S.RUNNING, S.COMPLETED, "r1")]
    with pytest.raises(TransitionRefused):
        done.requeue()  # COMPLETED is final


@pytest.mark.django_db
def test_task_methods__fail_cancel_requeue(push: Callable[..., Task]) -> None:
    task = push()
    [popped] = services.task_pop(scheduler_id="boefje")
    retried = popped.fail("boom", actor="r1")
    cancelled = retried.cancel(actor="op")
    requeued = cancelled.requeue(actor="op")

    assert (retried.status, cancelled.status, requeued.status) == (S.QUEUED, S.CANCELLED, S.QUEUED)
    assert requeued.attempts == 0
    assert task.events.count() == 5  # pushed, popped, failed, cancelled, requeued
    with pytest.raises(TransitionRefused):
        requeued.requeue()  # an active task is refused


# --- the event rows of every state machine ----------------------------------------------------


def test_status_event__every_event_model_shares_its_fields_and_order() -> None:
    for model in (TaskEvent, ScheduleEvent, ComputeElementEvent, PilotEvent):
        assert issubclass(model, StatusEvent)
        assert {"from_status", "to_status", "at", "actor", "note"} <= {
            field.name for field in model._meta.fields
        }
        assert model._meta.ordering == ["at", "id"]


@pytest.mark.django_db
def test_status_event__str_names_the_subject_and_the_move(push: Callable[..., Task]) -> None:
    task = push(data={"n": 1})

    [event] = _events(task)

    assert str(event) == f"{task.id}: - -> QUEUED"


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.parametrize(
    "statuses",
    [[TaskStatus.QUEUED], [TaskStatus.DISPATCHED, TaskStatus.RUNNING]],
    ids=["queued", "leased"],
)
def test_task_indexes__a_write_by_id_reads_the_primary_key_not_a_whole_partial_index(
    statuses: list[str],
) -> None:
    # See Task.Meta: with the status alone in the queue's and the leases' partial index
    # predicates, the planner scanned all queued (or leased) rows for one compare-and-swap
    # by id when the statistics were taken while those were few.
    analyzed_before_a_burst("burst", queued=1500, leased=1000)
    task = Task.objects.filter(status__in=statuses).first()
    plan = Task.objects.filter(id=task.id, status__in=statuses).explain()
    assert "tasks_task_pkey" in plan, plan


@pytest.mark.postgres
@pytest.mark.django_db
def test_task_indexes__the_queue_and_lease_scans_still_read_their_partial_indexes() -> None:
    analyzed_before_a_burst("burst", queued=1500, leased=1000)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Task._meta.db_table}")
    now = timezone.now()
    expired = Task.objects.filter(
        status__in=[TaskStatus.DISPATCHED, TaskStatus.RUNNING], lease_expires_at__lt=now
    ).order_by("lease_expires_at")
    assert "task_lease_idx" in expired[:10].explain()
    due = Task.objects.filter(scheduler_id="burst", status=TaskStatus.QUEUED, not_before__lte=now)
    assert "task_queue_idx" in due.order_by("priority", "created_at", "id")[:10].explain()
