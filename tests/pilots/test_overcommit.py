"""A CE is never over-committed, whatever runs at once: several processes submitting for
several VOs, cycles racing their submit_pilot tasks, and real Celery workers. Runs on both
databases (SQLite: IMMEDIATE transactions serialise the writers; PostgreSQL: the CE row lock)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from time_machine import TimeMachineFixture

from pilots import queues, services
from pilots.models import ACTIVE_PILOT_STATUSES, PilotStatus, PilotSubmission
from tasks import dispatch, execution
from tasks.models import ACTIVE_STATUSES, Scheduler, Task, TaskStatus
from tests.pilots.helpers import active_on, make_ce
from tests.processes import run_in_processes
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

CE = "ce-shared"
CAPACITY = 5
VOS = ("vo0", "vo1", "vo2")
PROCESSES = 8
P, S = PilotStatus, TaskStatus
PILOT_QUEUES = [queue for queue, _ in queues.QUEUES]


def _shared_ce(**fields: Any) -> None:
    make_ce(CE, capacity=CAPACITY, reliability=1.0, vos=VOS, **fields)


def _submit_tries(index: int, tries: int) -> int:
    wins = 0
    for _ in range(tries):
        try:
            services.pilot_submit(ce_name=CE, vo_name=VOS[index % 3], actor=f"p{index}")
        except services.NoFreeSlot:
            continue
        wins += 1
    return wins


def test_pilot_submit__concurrent_vos_never_overcommit_the_ce() -> None:
    _shared_ce()

    wins = run_in_processes(PROCESSES, _submit_tries, 20)

    assert sum(wins) == CAPACITY
    assert PilotSubmission.objects.count() == CAPACITY
    assert active_on(CE) == CAPACITY
    assert set(PilotSubmission.objects.values_list("status", flat=True)) == {P.SUBMITTED}
    assert not PilotSubmission.objects.filter(external_id="").exists()


def _run_dispatched(worker: str) -> tuple[Counter[str], int]:
    """Dispatch the submit_pilot queue and execute what is in the broker, as a worker would
    (another process may claim a task first: then it is "skipped"). Samples the CE's active
    pilots after each task."""
    outcomes: Counter[str] = Counter()
    most = 0
    dispatch.dispatch_scheduler(services.SUBMIT_ONE_QUEUE)
    dispatched = Task.objects.filter(scheduler_id=services.SUBMIT_ONE_QUEUE, status=S.DISPATCHED)
    for task_id, attempt in dispatched.values_list("id", "attempts"):
        outcomes[execution.execute(task_id, attempt, worker=worker)] += 1
        most = max(most, active_on(CE))
    return outcomes, most


def _cycles(index: int, rounds: int) -> tuple[dict[str, int], int]:
    vo = VOS[index % 3]
    outcomes: Counter[str] = Counter()
    most = 0
    for round_ in range(rounds):
        services.submit_pilots_for_vo(vo_name=vo)
        if index % 2:  # and an operator's direct submission (API, CLI), outside the CE mutex
            _submit_tries(index, 1)
        done, seen = _run_dispatched(f"p{index}")
        outcomes.update(done)
        most = max(most, seen, active_on(CE))
        if round_ % 3 == 2:
            services.check_pilots_for_vo(vo_name=vo)  # pilots end at once: slots free up
    return dict(outcomes), most


def test_submit_cycles__concurrent_cycles_and_submissions_never_overcommit(
    time_machine: TimeMachineFixture,
) -> None:
    _shared_ce(backend_settings={"start_after_seconds": 0, "run_seconds": 0})

    results = run_in_processes(PROCESSES, _cycles, 9)

    assert max(most for _, most in results) <= CAPACITY
    outcomes: Counter[str] = Counter()
    for done, _ in results:
        outcomes.update(done)
    assert outcomes["completed"] > CAPACITY, outcomes
    # What the processes left queued or deferred: run it now, past any lock-wait delay.
    for _ in range(10):
        time_machine.move_to(timezone.now() + timedelta(seconds=30))
        _run_dispatched("parent")
        if not Task.objects.filter(status__in=list(ACTIVE_STATUSES)).exists():
            break
    assert not Task.objects.filter(status__in=list(ACTIVE_STATUSES)).exists()
    assert active_on(CE) <= CAPACITY
    assert PilotSubmission.objects.count() > CAPACITY, "no slot was ever reused"
    assert set(PilotSubmission.objects.values_list("vo__name", flat=True)) == set(VOS)
    statuses = Counter(Task.objects.values_list("status", flat=True))
    assert set(statuses) == {S.COMPLETED}, statuses


@pytest.mark.e2e
def test_submit_cycles__real_workers_never_overcommit(start_worker: Any) -> None:
    _shared_ce(backend_settings={"start_after_seconds": 0, "run_seconds": 1})
    # The filesystem broker of the SQLite leg can lose a message sent while another is read;
    # a short lease has the reaper fail such a task soon (no retry: the next cycle resubmits).
    Scheduler.objects.filter(id__in=PILOT_QUEUES).update(lease_seconds=10)
    workers = [start_worker(name, pool="prefork", concurrency=2) for name in ("pa", "pb")]
    samples: list[int] = []

    def cycling() -> bool:
        samples.append(active_on(CE))
        queues.start_cycle("submit_pilots")
        queues.start_cycle("check_pilots")
        per_vo = Counter(PilotSubmission.objects.values_list("vo__name", flat=True))
        return set(per_vo) == set(VOS) and sum(per_vo.values()) >= 3 * CAPACITY

    def settled() -> bool:
        samples.append(active_on(CE))
        pending = Task.objects.filter(scheduler_id__in=PILOT_QUEUES, status__in=ACTIVE_STATUSES)
        return not pending.exists()

    try:
        wait_for(cycling, timeout=180, message="pilots of every VO, several rounds of slots")
        wait_for(settled, timeout=90, message="the pilot queues drained")
    except AssertionError:
        for worker in workers:
            print(f"--- {worker.name}", *worker.lines[-60:], sep="\n")
        raise

    assert max(samples) <= CAPACITY, samples
    assert active_on(CE) <= CAPACITY
    assert PilotSubmission.objects.filter(status__in=ACTIVE_PILOT_STATUSES).count() <= CAPACITY
    ends = Counter(
        (status, error == "lease expired (lost)" if error else None)
        for status, error in Task.objects.filter(scheduler_id__in=PILOT_QUEUES).values_list(
            "status", "error"
        )
    )
    assert ends[(S.COMPLETED, None)] > 3 * CAPACITY, ends
    assert set(ends) <= {(S.COMPLETED, None), (S.FAILED, True)}, ends
