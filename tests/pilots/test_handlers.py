"""The pilot handlers run as a worker runs them: tasks pushed to the system queues, dispatched,
then `execution.execute` in-process (claim, locks, handler, report)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from time_machine import TimeMachineFixture

from pilots import queues, services
from pilots.models import PilotReport, PilotStatus, PilotSubmission
from tasks import dispatch, execution, housekeeping, locks
from tasks import services as task_services
from tasks.locks import MutexLock
from tasks.models import Lock, Scheduler, Task, TaskStatus
from tests.pilots.helpers import T0, active_on, make_ce, make_pilot

P, S = PilotStatus, TaskStatus
pytestmark = pytest.mark.django_db


def _push(queue_id: str, **data: Any) -> Task:
    return task_services.task_push(scheduler_id=queue_id, data=data)


def _dispatched(queue_id: str) -> list[Task]:
    dispatch.dispatch_scheduler(queue_id)
    return list(
        Task.objects.filter(scheduler_id=queue_id, status=S.DISPATCHED).order_by("created_at")
    )


def _run(task: Task) -> str:
    return execution.execute(task.id, task.attempts, worker="t")


def _fresh(task: Task) -> Task:
    return Task.objects.get(id=task.id)


# --- submit_pilot ----------------------------------------------------------------------------


def test_submit_pilot__creates_a_pilot() -> None:
    make_ce("ce-a", capacity=1)
    _push(services.SUBMIT_ONE_QUEUE, ce="ce-a", vo="lhcb")
    [task] = _dispatched(services.SUBMIT_ONE_QUEUE)

    assert _run(task) == "completed"

    pilot = PilotSubmission.objects.get()
    task = _fresh(task)
    assert (task.status, task.attempts) == (S.COMPLETED, 1)
    assert task.result == {
        "pilot": str(pilot.id),
        "status": P.SUBMITTED,
        "external_id": pilot.external_id,
    }
    assert (pilot.ce.name, pilot.vo.name) == ("ce-a", "lhcb")
    assert not Lock.objects.exists()  # the CE's lock was released


def test_submit_pilot__no_free_slot_is_skipped_not_failed() -> None:
    ce = make_ce("ce-a", capacity=1, vos=["lhcb", "atlas"])
    make_pilot(ce, "atlas", status=P.RUNNING)
    _push(services.SUBMIT_ONE_QUEUE, ce="ce-a", vo="lhcb")
    [task] = _dispatched(services.SUBMIT_ONE_QUEUE)

    assert _run(task) == "completed"

    task = _fresh(task)
    assert task.status == S.COMPLETED
    assert set(task.result) == {"skipped"}
    assert "full: 1 of 1" in task.result["skipped"]
    assert PilotSubmission.objects.count() == 1


def test_submit_pilot__draining_ce_is_skipped() -> None:
    make_ce("ce-a", capacity=1, status="DRAINING")
    _push(services.SUBMIT_ONE_QUEUE, ce="ce-a", vo="lhcb")
    [task] = _dispatched(services.SUBMIT_ONE_QUEUE)

    assert _run(task) == "completed"
    assert "DRAINING" in _fresh(task).result["skipped"]


def test_submit_pilot__unknown_ce_fails_once_without_retry_or_dead_letter() -> None:
    _push(services.SUBMIT_ONE_QUEUE, ce="ce-gone", vo="lhcb")
    [task] = _dispatched(services.SUBMIT_ONE_QUEUE)

    assert _run(task) == "failed"

    task = _fresh(task)
    assert (task.status, task.attempts) == (S.FAILED, 1)
    assert task.error == "PilotNotFound: Compute element 'ce-gone' does not exist."


def test_submit_pilot__failed_submission_completes_with_a_failed_pilot() -> None:
    make_ce("ce-a", capacity=1, reliability=0.0)
    _push(services.SUBMIT_ONE_QUEUE, ce="ce-a", vo="lhcb")
    [task] = _dispatched(services.SUBMIT_ONE_QUEUE)

    assert _run(task) == "completed"

    assert _fresh(task).result["status"] == P.FAILED
    assert active_on("ce-a") == 0


def test_submit_pilot__ce_lock_held_defers_without_spending_the_attempt(
    time_machine: TimeMachineFixture,
) -> None:
    make_ce("ce-a", capacity=1)
    taken = locks.acquire([MutexLock("pilot", "ce-a")], owner="other", ttl=timedelta(minutes=1))
    assert taken == ["pilot:ce-a"]
    _push(services.SUBMIT_ONE_QUEUE, ce="ce-a", vo="lhcb")
    [task] = _dispatched(services.SUBMIT_ONE_QUEUE)

    assert _run(task) == "deferred"

    deferred = _fresh(task)
    assert (deferred.status, deferred.attempts, deferred.lock_waits) == (S.QUEUED, 0, 1)
    assert not PilotSubmission.objects.exists()
    assert Lock.objects.get().owner == "other"

    # Once the holder lets go (and the short lock-wait delay passed), it runs on attempt 1.
    locks.release(taken, owner="other")
    time_machine.move_to(timezone.now() + timedelta(seconds=5))
    [again] = _dispatched(services.SUBMIT_ONE_QUEUE)
    assert again.attempts == 1
    assert _run(again) == "completed"
    assert PilotSubmission.objects.count() == 1


def test_submit_pilot__lock_of_another_ce_does_not_block() -> None:
    make_ce("ce-a", capacity=1)
    locks.acquire([MutexLock("pilot", "ce-b")], owner="other", ttl=timedelta(minutes=1))
    _push(services.SUBMIT_ONE_QUEUE, ce="ce-a", vo="lhcb")
    [task] = _dispatched(services.SUBMIT_ONE_QUEUE)

    assert _run(task) == "completed"
    assert PilotSubmission.objects.count() == 1


# --- submit_pilots, check_pilots, pilot_report -----------------------------------------------


def test_start_cycle__a_full_queue_skips_the_rest_of_the_vos_without_failing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_ce("ce-a", capacity=2, vos=["lhcb", "atlas"])
    queue = Scheduler.objects.get(id=services.SUBMIT_PILOTS_QUEUE)
    task_services.scheduler_update(scheduler=queue, max_queue_size=1)

    assert queues.start_cycle("submit_pilots") == ["atlas"]

    assert Task.objects.filter(scheduler_id=services.SUBMIT_PILOTS_QUEUE).count() == 1
    assert "is full; skipped lhcb" in caplog.text


def test_submit_pilots__cycle_pushes_submit_tasks_which_create_pilots() -> None:
    make_ce("ce-a", capacity=2, vos=["lhcb", "atlas"])
    make_ce("ce-b", capacity=1, vos=["atlas"])
    assert queues.start_cycle("submit_pilots") == ["atlas", "lhcb"]
    cycle = _dispatched(services.SUBMIT_PILOTS_QUEUE)

    assert [_run(task) for task in cycle] == ["completed", "completed"]
    results = {t.data["vo"]: _fresh(t).result for t in cycle}
    assert results == {
        "atlas": {"vo": "atlas", "submit_tasks": {"ce-a": 2, "ce-b": 1}},
        "lhcb": {"vo": "lhcb", "submit_tasks": {}},  # ce-a's slots were already queued
    }

    submits = _dispatched(services.SUBMIT_ONE_QUEUE)
    assert len(submits) == 3
    assert [_run(task) for task in submits] == ["completed"] * 3
    assert (active_on("ce-a"), active_on("ce-b")) == (2, 1)


def test_submit_pilots__vo_mutex_held_defers_only_that_vo() -> None:
    make_ce("ce-a", capacity=2, vos=["lhcb", "atlas"])
    locks.acquire(
        [MutexLock("pilots.submit_pilots", "lhcb")], owner="other", ttl=timedelta(minutes=1)
    )
    queues.start_cycle("submit_pilots")

    outcomes = {t.data["vo"]: _run(t) for t in _dispatched(services.SUBMIT_PILOTS_QUEUE)}

    assert outcomes == {"atlas": "completed", "lhcb": "deferred"}


def test_check_pilots__advances_the_vos_pilots(clock: TimeMachineFixture) -> None:
    make_ce("ce-a", capacity=3, backend_settings={"start_after_seconds": 1, "run_seconds": 5})
    first = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")
    clock.move_to(T0 + timedelta(seconds=3), tick=False)
    second = services.pilot_submit(ce_name="ce-a", vo_name="lhcb")
    clock.move_to(T0 + timedelta(seconds=6.5), tick=False)
    queues.start_cycle("check_pilots")
    [task] = _dispatched(services.CHECK_PILOTS_QUEUE)

    assert _run(task) == "completed"

    assert _fresh(task).result == {"vo": "lhcb", "moved": {P.DONE: 1, P.RUNNING: 1}}
    statuses = {p.id: p.status for p in PilotSubmission.objects.all()}
    assert statuses == {first.id: P.DONE, second.id: P.RUNNING}


def test_pilot_report__stores_a_report() -> None:
    ce = make_ce("ce-a", capacity=3)
    make_pilot(ce, status=P.RUNNING)
    make_pilot(ce, status=P.FAILED)
    queues.start_cycle("pilot_report")
    [task] = _dispatched(services.REPORT_QUEUE)

    assert _run(task) == "completed"

    report = PilotReport.objects.get()
    expected = {"SUBMITTED": 0, "RUNNING": 1, "DONE": 0, "FAILED": 1}
    assert _fresh(task).result == {"report": report.id, "by_status": expected}
    assert report.by_ce == {"ce-a": {"RUNNING": 1, "FAILED": 1}}


def test_submit_pilot__lost_lease_fails_without_retry(time_machine: TimeMachineFixture) -> None:
    make_ce("ce-a", capacity=1)
    _push(services.SUBMIT_ONE_QUEUE, ce="ce-a", vo="lhcb")
    [task] = _dispatched(services.SUBMIT_ONE_QUEUE)
    # A worker claims it and dies (an unclaimed one would be handed back and sent again).
    task_services.task_start(task_id=task.id, attempt=task.attempts, mint_token=True)
    time_machine.move_to(timezone.now() + timedelta(seconds=121))

    assert housekeeping.tasks_reap_expired() == 1

    lost = _fresh(task)
    assert (lost.status, lost.attempts, lost.error) == (S.FAILED, 1, "lease expired (lost)")
    note = lost.events.order_by("-at", "-id").first().note
    assert note == "attempt 1/1 failed: lease expired (lost); no attempts left"
