"""Mutexes as lease rows in the database (DESIGN 4.5, DiracX's MutexLock): names, acquire,
extend, release, take-over of an expired lock, all-or-nothing acquire of several locks, and
several processes at once never holding one lock together."""

from __future__ import annotations

import itertools
import time
from datetime import timedelta

import pytest
from time_machine import TimeMachineFixture

from tasks import locks
from tasks.locks import MutexLock
from tasks.models import Lock, Scheduler
from tests.processes import run_in_processes
from tests.tasks.helpers import T0

TTL = timedelta(seconds=30)


def _owners() -> dict[str, str]:
    return dict(Lock.objects.values_list("name", "owner"))


# --- names -----------------------------------------------------------------------------------


def test_mutex_lock__name_joins_type_and_keys() -> None:
    assert MutexLock("pilot", "ce-1").name == "pilot:ce-1"
    assert MutexLock("pilot", "ce-1", "vo").name == "pilot:ce-1:vo"


def test_mutex_lock__class_level_lock_is_the_type_alone() -> None:
    assert MutexLock("cycle").name == "cycle"
    assert MutexLock("cycle").keys == ()


def test_mutex_lock__keys_are_stringified_so_equal_names_are_equal_locks() -> None:
    assert MutexLock("job", 7).keys == ("7",)
    assert MutexLock("job", 7) == MutexLock("job", "7")
    assert len({MutexLock("job", 7), MutexLock("job", "7")}) == 1
    assert MutexLock("job", 7) != MutexLock("job", 8)


def test_mutex_lock__name_fits_the_column() -> None:
    long = MutexLock("t", "k" * 400)
    assert len(long.name) == Lock._meta.get_field("name").max_length == 255
    assert long.name.startswith("t:kkk")


def test_mutex_lock__orders_by_type_then_keys() -> None:
    shuffled = [MutexLock("b", "1"), MutexLock("a", "2"), MutexLock("a", "1")]
    assert [lock.name for lock in sorted(shuffled)] == ["a:1", "a:2", "b:1"]


# --- acquire / extend / release --------------------------------------------------------------


@pytest.mark.django_db
def test_acquire__free_lock_is_taken_with_a_lease(time_machine: TimeMachineFixture) -> None:
    time_machine.move_to(T0, tick=False)

    taken = locks.acquire([MutexLock("pilot", "ce-1")], owner="task-a", ttl=TTL)

    assert taken == ["pilot:ce-1"]
    row = Lock.objects.get(name="pilot:ce-1")
    assert (row.owner, row.acquired_at, row.expires_at) == ("task-a", T0, T0 + TTL)
    assert locks.holder(MutexLock("pilot", "ce-1")) == row


@pytest.mark.django_db
def test_acquire__no_locks_is_an_empty_success() -> None:
    assert locks.acquire([], owner="task-a", ttl=TTL) == []
    assert not Lock.objects.exists()


@pytest.mark.django_db
def test_acquire__held_lock_is_not_taken_by_another_owner(
    time_machine: TimeMachineFixture,
) -> None:
    time_machine.move_to(T0, tick=False)
    locks.acquire([MutexLock("pilot", "ce-1")], owner="task-a", ttl=TTL)
    time_machine.move_to(T0 + TTL - timedelta(seconds=1), tick=False)

    assert locks.acquire([MutexLock("pilot", "ce-1")], owner="task-b", ttl=TTL) is None

    row = Lock.objects.get(name="pilot:ce-1")
    assert (row.owner, row.expires_at) == ("task-a", T0 + TTL)


@pytest.mark.django_db
def test_acquire__expired_lock_is_taken_over(time_machine: TimeMachineFixture) -> None:
    time_machine.move_to(T0, tick=False)
    locks.acquire([MutexLock("pilot", "ce-1")], owner="task-a", ttl=TTL)
    later = T0 + TTL + timedelta(seconds=1)
    time_machine.move_to(later, tick=False)
    assert locks.holder(MutexLock("pilot", "ce-1")) is None

    taken = locks.acquire([MutexLock("pilot", "ce-1")], owner="task-b", ttl=TTL)

    assert taken == ["pilot:ce-1"]
    row = Lock.objects.get(name="pilot:ce-1")
    assert (row.owner, row.acquired_at, row.expires_at) == ("task-b", later, later + TTL)
    # The old owner cannot extend nor release what it lost.
    assert locks.extend(["pilot:ce-1"], owner="task-a", ttl=TTL) == 0
    locks.release(["pilot:ce-1"], owner="task-a")
    assert _owners() == {"pilot:ce-1": "task-b"}


@pytest.mark.django_db
def test_acquire__same_owner_reacquires_and_renews(
    time_machine: TimeMachineFixture,
) -> None:
    time_machine.move_to(T0, tick=False)
    locks.acquire([MutexLock("pilot", "ce-1")], owner="task-a", ttl=TTL)
    time_machine.move_to(T0 + timedelta(seconds=10), tick=False)

    assert locks.acquire([MutexLock("pilot", "ce-1")], owner="task-a", ttl=TTL) == ["pilot:ce-1"]

    row = Lock.objects.get(name="pilot:ce-1")
    assert (row.owner, row.expires_at) == ("task-a", T0 + timedelta(seconds=10) + TTL)
    assert Lock.objects.count() == 1


@pytest.mark.django_db
def test_acquire__several_locks_all_taken_in_name_order_without_duplicates() -> None:
    wanted = [MutexLock("vo", "lhcb"), MutexLock("cycle"), MutexLock("vo", "lhcb")]

    taken = locks.acquire(wanted, owner="task-a", ttl=TTL)

    assert taken == ["cycle", "vo:lhcb"]
    assert _owners() == {"cycle": "task-a", "vo:lhcb": "task-a"}


@pytest.mark.parametrize("held", ["a:1", "b:2", "c:3"])
@pytest.mark.django_db
def test_acquire__several_locks_all_or_nothing(held: str) -> None:
    wanted = [MutexLock("a", 1), MutexLock("b", 2), MutexLock("c", 3)]
    held_lock = next(lock for lock in wanted if lock.name == held)
    assert locks.acquire([held_lock], owner="other", ttl=TTL) == [held]

    assert locks.acquire(wanted, owner="task-a", ttl=TTL) is None

    assert _owners() == {held: "other"}, "a lock taken before the held one was kept"


@pytest.mark.django_db
def test_extend__pushes_the_lease_of_our_locks_only(
    time_machine: TimeMachineFixture,
) -> None:
    time_machine.move_to(T0, tick=False)
    locks.acquire([MutexLock("a"), MutexLock("b")], owner="task-a", ttl=TTL)
    locks.acquire([MutexLock("c")], owner="task-b", ttl=TTL)
    time_machine.move_to(T0 + timedelta(seconds=20), tick=False)

    assert locks.extend(["a", "b", "c"], owner="task-a", ttl=TTL) == 2
    assert locks.extend([], owner="task-a", ttl=TTL) == 0

    expiry = dict(Lock.objects.values_list("name", "expires_at"))
    renewed = T0 + timedelta(seconds=20) + TTL
    assert expiry == {"a": renewed, "b": renewed, "c": T0 + TTL}


@pytest.mark.django_db
def test_extend__keeps_a_lock_from_being_taken_over(
    time_machine: TimeMachineFixture,
) -> None:
    time_machine.move_to(T0, tick=False)
    locks.acquire([MutexLock("a")], owner="task-a", ttl=TTL)
    time_machine.move_to(T0 + timedelta(seconds=25), tick=False)
    locks.extend(["a"], owner="task-a", ttl=TTL)
    time_machine.move_to(T0 + timedelta(seconds=40), tick=False)  # past the first lease

    assert locks.acquire([MutexLock("a")], owner="task-b", ttl=TTL) is None
    assert _owners() == {"a": "task-a"}


@pytest.mark.django_db
def test_release__frees_our_locks_and_leaves_others() -> None:
    locks.acquire([MutexLock("a"), MutexLock("b")], owner="task-a", ttl=TTL)
    locks.acquire([MutexLock("c")], owner="task-b", ttl=TTL)

    locks.release(["a", "b", "c"], owner="task-a")
    locks.release([], owner="task-a")

    assert _owners() == {"c": "task-b"}
    assert locks.acquire([MutexLock("a")], owner="task-c", ttl=TTL) == ["a"]


# --- several processes at once ---------------------------------------------------------------

PROCESSES = 8
TRIES = 200
COUNTER = "lock-counter"


def _contend(index: int) -> dict[str, object]:
    """Try the lock TRIES times; under it, bump the counter by read-then-write (a lost update
    if two processes ever held it together). Holds are (owner, acquired, released)."""
    owner = f"p{index}"
    lock = MutexLock("conc", "one")
    holds: list[tuple[str, int, int]] = []
    refused = 0
    for _ in range(TRIES):
        names = locks.acquire([lock], owner=owner, ttl=timedelta(seconds=60))
        if names is None:
            refused += 1
        else:
            # CLOCK_MONOTONIC is one clock for the whole machine on Linux: comparable across
            # processes. The stamps are taken inside the hold, so real holds contain them.
            acquired = time.monotonic_ns()
            value = Scheduler.objects.values_list("max_queue_size", flat=True).get(id=COUNTER)
            Scheduler.objects.filter(id=COUNTER).update(max_queue_size=value + 1)
            released = time.monotonic_ns()
            locks.release(names, owner=owner)
            holds.append((owner, acquired, released))
        # Work outside the lock between tries, as a task does between runs: without it the
        # holder takes the lock back at once and the others spend their tries meanwhile.
        Lock.objects.filter(name=lock.name).exists()
        Scheduler.objects.filter(id=COUNTER).exists()
    return {"holds": holds, "refused": refused}


@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_acquire__concurrent_processes_never_hold_one_lock_together() -> None:
    Scheduler.objects.create(id=COUNTER, max_queue_size=0)

    results = run_in_processes(PROCESSES, _contend)

    holds = sorted((h for r in results for h in r["holds"]), key=lambda h: h[1])
    refused = sum(r["refused"] for r in results)
    assert len(holds) + refused == PROCESSES * TRIES
    counter = Scheduler.objects.get(id=COUNTER).max_queue_size
    assert counter == len(holds), f"{len(holds) - counter} lost updates: two holders at once"
    for (owner_a, _, released), (owner_b, acquired, _) in itertools.pairwise(holds):
        assert acquired > released, f"{owner_a} and {owner_b} held the lock at the same time"
    assert len({owner for owner, _, _ in holds}) > 1, "only one process ever got the lock"
    assert refused, "no try ever found the lock held: the processes never contended"
    assert not Lock.objects.exists(), "a released lock row was left behind"
