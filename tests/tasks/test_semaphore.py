"""Semaphores (DESIGN 9.4): `Semaphore(object_type, *keys, limit=N)` is held by up to N owners
at once, on the lock table's lease rows, with the MutexLock's takeover of expired holders;
a MutexLock is the case N = 1. Under 8 processes at once it never has more than N holders."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from time_machine import TimeMachineFixture

from tasks import dispatch, execution, locks, services
from tasks.locks import MutexLock, Semaphore
from tasks.models import Lock, Scheduler, Task, TaskStatus
from tasks.registry import register
from tests.processes import run_in_processes
from tests.tasks.helpers import T0

TTL = timedelta(seconds=30)


def test_semaphore__names_its_slots_and_checks_its_limit() -> None:
    assert Semaphore("ce", "ce-1", limit=3).slot_names == ["ce:ce-1", "ce:ce-1#1", "ce:ce-1#2"]
    assert Semaphore("ce", "ce-1", limit=1).slot_names == [MutexLock("ce", "ce-1").name]
    assert Semaphore("job", 7, limit=2) == Semaphore("job", "7", limit=2)
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match="limit must be 1 to 1000"):
            Semaphore("ce", limit=bad)
    with pytest.raises(TypeError):
        Semaphore("ce", limit="3")  # type: ignore[arg-type]


@pytest.mark.django_db
def test_acquire__n_owners_hold_a_semaphore_and_the_next_is_refused() -> None:
    sem = Semaphore("ce", "ce-1", limit=3)

    taken = [locks.acquire([sem], owner=f"task-{n}", ttl=TTL) for n in range(4)]

    assert all(names and len(names) == 1 for names in taken[:3]) and taken[3] is None
    assert {names[0] for names in taken[:3] if names} == set(sem.slot_names)
    assert len(locks.holders(sem)) == 3


@pytest.mark.django_db
def test_acquire__an_owner_holding_a_slot_renews_it_rather_than_taking_two() -> None:
    sem = Semaphore("ce", limit=2)
    first = locks.acquire([sem], owner="task-a", ttl=TTL)

    again = locks.acquire([sem], owner="task-a", ttl=TTL)

    assert again == first and len(locks.holders(sem)) == 1
    assert locks.acquire([sem], owner="task-b", ttl=TTL) is not None


@pytest.mark.django_db
def test_release__frees_the_slot_for_another_owner() -> None:
    sem = Semaphore("ce", limit=1)
    names = locks.acquire([sem], owner="task-a", ttl=TTL)
    assert names is not None and locks.acquire([sem], owner="task-b", ttl=TTL) is None

    locks.release(names, owner="task-a")

    assert locks.acquire([sem], owner="task-b", ttl=TTL) == names


@pytest.mark.django_db
def test_acquire__an_expired_holder_is_taken_over(time_machine: TimeMachineFixture) -> None:
    time_machine.move_to(T0, tick=False)
    sem = Semaphore("ce", limit=2)
    locks.acquire([sem], owner="task-a", ttl=TTL)
    locks.acquire([sem], owner="task-b", ttl=timedelta(minutes=5))
    assert locks.acquire([sem], owner="task-c", ttl=TTL) is None

    time_machine.move_to(T0 + TTL + timedelta(seconds=1), tick=False)
    taken = locks.acquire([sem], owner="task-c", ttl=TTL)

    assert taken is not None
    assert {row.owner for row in locks.holders(sem)} == {"task-b", "task-c"}
    assert locks.extend(taken, owner="task-a", ttl=TTL) == 0  # task-a lost its slot


@pytest.mark.django_db
def test_acquire__with_a_mutex_is_all_or_nothing() -> None:
    sem = Semaphore("ce", limit=1)
    locks.acquire([sem], owner="other", ttl=TTL)

    assert locks.acquire([MutexLock("a"), sem], owner="task-a", ttl=TTL) is None

    assert not Lock.objects.filter(owner="task-a").exists()


@pytest.mark.django_db
def test_handler__declares_a_semaphore_and_the_worker_holds_a_slot(
    restore_handlers: None, make_scheduler: Callable[..., Scheduler]
) -> None:
    seen: list[list[str]] = []

    def body(ctx: Any) -> str:
        seen.append([row.owner for row in locks.holders(Semaphore("sem-test", limit=2))])
        return "done"

    register("test.sem", locks=lambda data: [Semaphore("sem-test", limit=2)])(body)
    make_scheduler("sem", kind="celery", handler="test.sem")
    task = services.task_push(scheduler_id="sem")
    assert dispatch.dispatch_scheduler("sem") == 1
    fresh = Task.objects.get(id=task.id)

    assert execution.execute(task.id, fresh.attempts, worker="w") == "completed"

    assert seen == [[str(task.id)]]
    assert not Lock.objects.exists()  # released in finally
    assert Task.objects.get(id=task.id).status == TaskStatus.COMPLETED


# --- several processes at once ---------------------------------------------------------------

PROCESSES = 8
TRIES = 60
LIMIT = 3


def _contend(index: int) -> dict[str, Any]:
    """Take a slot TRIES times; under it, count the live holders (never above LIMIT) and keep
    the hold open a moment so that holds overlap. Holds are (acquired, released) stamps."""
    sem = Semaphore("conc", "sem", limit=LIMIT)
    holds: list[tuple[int, int]] = []
    seen_holders: list[int] = []
    refused = 0
    for _ in range(TRIES):
        names = locks.acquire([sem], owner=f"p{index}", ttl=timedelta(seconds=60))
        if names is None:
            refused += 1
            continue
        acquired = time.monotonic_ns()
        seen_holders.append(len(locks.holders(sem)))
        time.sleep(0.002)
        released = time.monotonic_ns()
        locks.release(names, owner=f"p{index}")
        holds.append((acquired, released))
    return {"holds": holds, "seen": seen_holders, "refused": refused}


def _most_at_once(holds: list[tuple[int, int]]) -> int:
    edges = sorted([(a, 1) for a, _ in holds] + [(r, -1) for _, r in holds])
    current = most = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_acquire__eight_processes_never_hold_a_semaphore_more_than_n_times() -> None:
    results = run_in_processes(PROCESSES, _contend)

    holds = [h for r in results for h in r["holds"]]
    assert len(holds) + sum(r["refused"] for r in results) == PROCESSES * TRIES
    assert max(s for r in results for s in r["seen"]) <= LIMIT
    assert _most_at_once(holds) <= LIMIT, "more than LIMIT holders at once"
    assert _most_at_once(holds) > 1, "never two holders at once: a mutex, not a semaphore"
    assert not Lock.objects.exists(), "a released slot row was left behind"
