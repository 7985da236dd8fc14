"""Flow control exact under concurrency (DESIGN §9.4, issue 15 part 7): 8 processes popping
one queue at once on PostgreSQL. Never more than N active per key, never more hand-outs than
the rate allows in any window, every value served in its turn under fair_key."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.models import Count

from tasks import services
from tasks.leases import LeaseProof
from tasks.models import LEASED_STATUSES, Task, TaskEvent, TaskStatus
from tests.processes import run_in_processes
from tests.support.seed import seed_queued

pytestmark = [
    pytest.mark.concurrency,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
]

PROCESSES = 8


def _pop_until_empty(index: int, scheduler_id: str, limit: int) -> list[str]:
    popped: list[str] = []
    while tasks := services.task_pop(scheduler_id=scheduler_id, limit=limit, worker=f"w{index}"):
        popped += [str(task.id) for task in tasks]
    return popped


# Pops of one take a pick of their own on PostgreSQL (tasks.queue.handout), batches another.
@pytest.mark.parametrize("limit", [1, 2])
def test_task_pop__concurrent_poppers_never_pass_the_concurrency_limit(limit: int) -> None:
    services.scheduler_create(id="conc", concurrency_key="org.id", concurrency_limit=3)
    for org in range(20):
        seed_queued("conc", 20, data={"org": {"id": org}})

    results = run_in_processes(PROCESSES, _pop_until_empty, "conc", limit)

    popped = [task_id for result in results for task_id in result]
    assert len(popped) == len(set(popped))  # none twice
    active = Counter(
        Task.objects.filter(status=TaskStatus.DISPATCHED).values_list(
            "concurrency_value", flat=True
        )
    )
    # Nothing completes: each value holds exactly its 3 slots, not one more, not one less.
    assert active == {str(org): 3 for org in range(20)}


def _pop_and_finish(index: int, scheduler_id: str, limit: int) -> dict[str, int]:
    """Pop, look at the active counts (a snapshot), then complete what was popped."""
    most: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tasks = services.task_pop(scheduler_id=scheduler_id, limit=limit, worker=f"w{index}")
        if (
            not tasks
            and not Task.objects.filter(scheduler_id=scheduler_id)
            .exclude(status=TaskStatus.COMPLETED)
            .exists()
        ):
            return most
        snapshot = (
            Task.objects.filter(scheduler_id=scheduler_id, status__in=LEASED_STATUSES)
            .values("concurrency_value")
            .annotate(n=Count("id"))
        )
        for row in snapshot:
            most[row["concurrency_value"]] = max(most.get(row["concurrency_value"], 0), row["n"])
        for task in tasks:
            proof = LeaseProof(token=task.lease_token)
            services.task_complete(task_id=task.id, result=None, attempt=task.attempts, proof=proof)
    raise AssertionError("queue not drained in 120 s")


@pytest.mark.parametrize("limit", [1, 3])
def test_task_pop__concurrency_limit_holds_while_tasks_finish(limit: int) -> None:
    services.scheduler_create(id="churn", concurrency_key="org", concurrency_limit=2)
    for org in range(6):
        seed_queued("churn", 30, data={"org": f"o{org}"})

    results = run_in_processes(PROCESSES, _pop_and_finish, "churn", limit)

    assert Counter(Task.objects.values_list("status", flat=True)) == {TaskStatus.COMPLETED: 180}
    assert max(n for most in results for n in most.values()) <= 2
    _assert_overlaps_at_most("churn", 2)


def _assert_overlaps_at_most(scheduler_id: str, limit: int) -> None:
    """From the events: per value, no instant where more than `limit` attempts were between
    their hand-out and their end (hand-outs read the clock after the active counts)."""
    events = TaskEvent.objects.filter(task__scheduler_id=scheduler_id).values_list(
        "task__concurrency_value", "to_status", "at"
    )
    marks: dict[str, list[tuple[Any, int]]] = {}
    for value, to_status, at in events:
        if to_status == TaskStatus.DISPATCHED:
            marks.setdefault(value, []).append((at, 1))
        elif to_status == TaskStatus.COMPLETED:
            marks.setdefault(value, []).append((at, -1))
    for value, changes in marks.items():
        level = 0
        for _, change in sorted(changes):  # an end before a start at the same instant
            level += change
            assert level <= limit, f"{value}: {level} active at once"


def _pop_for(index: int, scheduler_id: str, seconds: float) -> int:
    popped, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        popped += len(services.task_pop(scheduler_id=scheduler_id, limit=5, worker=f"w{index}"))
    return popped


def test_task_pop__concurrent_poppers_never_pass_the_rate() -> None:
    services.scheduler_create(id="rated", rate_limit="40/s")
    seed_queued("rated", 1000)

    results = run_in_processes(PROCESSES, _pop_for, "rated", 2.5)

    times = sorted(
        TaskEvent.objects.filter(to_status=TaskStatus.DISPATCHED).values_list("at", flat=True)
    )
    assert sum(results) == len(times) > 40
    for start, at in enumerate(times):  # every window of one second from a hand-out on
        inside = [t for t in times[start : start + 41] if (t - at).total_seconds() < 1]
        assert len(inside) <= 40, f"{len(inside)} hand-outs in the second from {at}"


def _pop_times(index: int, scheduler_id: str, times: int) -> list[str]:
    popped: list[str] = []
    for _ in range(times):
        tasks = services.task_pop(scheduler_id=scheduler_id, limit=1, worker=f"w{index}")
        popped += [str(task.id) for task in tasks]
    return popped


def test_task_pop__concurrent_poppers_serve_every_fair_value_in_turn() -> None:
    services.scheduler_create(id="fair", fair_key="org")
    seed_queued("fair", 1000, data={"org": "huge"}, priority=0)
    for n in range(50):
        seed_queued("fair", 10, data={"org": f"small-{n:02}"}, priority=5)

    results = run_in_processes(PROCESSES, _pop_times, "fair", 25)

    popped = [task_id for result in results for task_id in result]
    assert len(popped) == len(set(popped)) == 200
    order = (
        TaskEvent.objects.filter(to_status=TaskStatus.DISPATCHED)
        .order_by("at", "id")
        .values_list("task__fair_value", flat=True)
    )
    assert len(set(order[:51])) == 51  # every value within the first 51 hand-outs


def _pop_in_thread(scheduler_id: str, limit: int, out: list[list[Task]]) -> None:
    try:
        out.append(services.task_pop(scheduler_id=scheduler_id, limit=limit, worker="late"))
    finally:
        connection.close()


def _wait_until_blocked_on_a_lock() -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")  # else one per transaction
            cursor.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            )
            if cursor.fetchone()[0]:
                return
        time.sleep(0.01)
    raise AssertionError("the second pop never waited for the flow lock")


@pytest.mark.parametrize("limit", [1, 2])
def test_task_pop__a_pop_that_waited_for_the_lock_counts_what_the_holder_handed_out(
    limit: int,
) -> None:
    """The one-statement hand-out's snapshot predates its wait for the queue's lock, so the
    holder's hand-outs are not in it: here the holder (a transaction, as a dispatch is) takes
    the last slot of "b", then a task of "a" pushed after the waiter's snapshot. The waiter
    must see that and count again under the lock, not take a second task of "a"."""
    services.scheduler_create(id="stale", concurrency_key="org", concurrency_limit=1)
    seed_queued("stale", 2, data={"org": "b"}, priority=5)
    seed_queued("stale", 1, data={"org": "a"}, priority=5)
    seed_queued("stale", 1, data={"org": "c"}, priority=0)
    services.task_pop(scheduler_id="stale", limit=1, worker="warm")  # "c": the state row
    out: list[list[Task]] = []
    with transaction.atomic():  # the holder: the lock until it commits
        held = services.task_pop(scheduler_id="stale", limit=1, worker="holder")
        late = threading.Thread(target=_pop_in_thread, args=("stale", limit, out))
        late.start()
        _wait_until_blocked_on_a_lock()
        seed_queued("stale", 1, data={"org": "a"}, priority=0)
        held += services.task_pop(scheduler_id="stale", limit=1, worker="holder")
    late.join(30)

    assert [task.data["org"] for task in held] == ["b", "a"]
    assert out == [[]]
    active = Task.objects.filter(status=TaskStatus.DISPATCHED)
    assert sorted(active.values_list("concurrency_value", flat=True)) == ["a", "b", "c"]


@pytest.mark.parametrize("limit", [1, 2])
def test_task_pop__a_task_a_cancel_holds_is_waited_for_and_never_handed_out(limit: int) -> None:
    """The one-statement hand-out does not lock the task it picks (the queue's FlowState
    lock keeps every other hand-out out): a picked task that a cancel is changing is waited
    for, and the claim's status test, the compare-and-swap, then refuses it."""
    services.scheduler_create(id="cas", concurrency_key="org", concurrency_limit=5)
    seed_queued("cas", 1, data={"org": "w"}, priority=0)
    seed_queued("cas", 1, data={"org": "a"}, priority=1)
    seed_queued("cas", 1, data={"org": "b"}, priority=5)
    services.task_pop(scheduler_id="cas", limit=1, worker="warm")  # "w": the state row
    head = Task.objects.get(scheduler_id="cas", data__org="a")
    out: list[list[Task]] = []
    with transaction.atomic():  # the cancel holds the head's row until it commits
        services.task_cancel(task_id=head.id, actor="operator")
        late = threading.Thread(target=_pop_in_thread, args=("cas", limit, out))
        late.start()
        _wait_until_blocked_on_a_lock()
    late.join(30)

    assert [[task.data["org"] for task in tasks] for tasks in out] == [["b"][: limit - 1]]
    head.refresh_from_db()
    assert head.status == TaskStatus.CANCELLED
    handed = TaskEvent.objects.filter(task_id=head.id, to_status=TaskStatus.DISPATCHED)
    assert not handed.exists()
