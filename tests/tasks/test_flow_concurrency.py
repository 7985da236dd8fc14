"""Flow control exact under concurrency (DESIGN §9.4, issue 15 part 7): 8 processes popping
one queue at once on PostgreSQL. Never more than N active per key, never more hand-outs than
the rate allows in any window, every value served in its turn under fair_key."""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib.admin import site
from django.db import connection, transaction
from django.db.models import Count
from django.http import HttpRequest

from tasks import batches, services
from tasks.admin import SchedulerAdmin
from tasks.leases import LeaseProof
from tasks.models import LEASED_STATUSES, Scheduler, Task, TaskEvent, TaskStatus
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


def _a_session_waits_on_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # else one per transaction
        cursor.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
        return bool(cursor.fetchone()[0])


def _wait_until_blocked_on_a_lock() -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _a_session_waits_on_a_lock():
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


# Both hand-out paths: the one statement (a concurrency key alone), and the locked path's
# statements (a concurrency key with a fair key).
HANDOUT_PATHS = [pytest.param("", id="one-statement"), pytest.param("org", id="locked-path")]


def _flow_queue_behind_a_warm_head(scheduler_id: str, orgs: list[str], fair_key: str) -> None:
    """A concurrency-keyed queue whose first task ("0") was handed out (the state row
    exists), then the given values' tasks, one each, in this order (which is also the fair
    key's order of values)."""
    services.scheduler_create(
        id=scheduler_id, concurrency_key="org", concurrency_limit=5, fair_key=fair_key
    )
    for priority, org in enumerate(["0", *orgs]):
        seed_queued(scheduler_id, 1, data={"org": org}, priority=priority)
    services.task_pop(scheduler_id=scheduler_id, limit=1, worker="warm")


def _pop_beside(scheduler_id: str, limit: int) -> tuple[threading.Thread, list[list[Task]]]:
    out: list[list[Task]] = []
    thread = threading.Thread(target=_pop_in_thread, args=(scheduler_id, limit, out))
    thread.start()
    return thread, out


@pytest.mark.parametrize("fair_key", HANDOUT_PATHS)
@pytest.mark.parametrize("limit", [1, 2])
def test_task_pop__a_task_a_cancel_holds_is_skipped_and_never_handed_out(
    limit: int, fair_key: str
) -> None:
    """A flow pick skips a task another transaction holds (SKIP LOCKED, as the plain pop):
    waiting for it would wait while holding the queue's FlowState lock."""
    _flow_queue_behind_a_warm_head("cas", ["a", "b"], fair_key)
    head = Task.objects.get(scheduler_id="cas", data__org="a")
    with transaction.atomic():  # the cancel holds the head's row until it commits
        services.task_cancel(task_id=head.id, actor="operator")
        late, out = _pop_beside("cas", limit)
        late.join(30)
        assert not late.is_alive(), "the pop waited for the row the cancel holds"

    # Both take the next task: a pop of one picks again past the held head.
    assert [[task.data["org"] for task in tasks] for tasks in out] == [["b"]]
    head.refresh_from_db()
    assert head.status == TaskStatus.CANCELLED
    handed = TaskEvent.objects.filter(task_id=head.id, to_status=TaskStatus.DISPATCHED)
    assert not handed.exists()


@pytest.mark.parametrize("fair_key", HANDOUT_PATHS)
def test_task_pop__a_pop_of_one_past_a_held_head_keeps_the_limit_and_the_rate(
    fair_key: str,
) -> None:
    """A concurrency key and a rate of 3 a minute: "a" was handed out (one token) and is at
    its limit, the head ("b") is held by a cancel, then "c", "d", "e". The pop of one takes
    "c"; the pick that found "b" held spent no token, so one more pop takes "d", and the
    third finds the rate spent though "e" is due."""
    services.scheduler_create(
        id="hr", concurrency_key="org", concurrency_limit=1, fair_key=fair_key, rate_limit="3/m"
    )
    for priority, org in enumerate(["a", "b", "a", "c", "d", "e"]):
        seed_queued("hr", 1, data={"org": org}, priority=priority)
    assert [t.data["org"] for t in services.task_pop(scheduler_id="hr", worker="w")] == ["a"]
    head = Task.objects.get(scheduler_id="hr", data__org="b")
    with transaction.atomic():
        services.task_cancel(task_id=head.id, actor="operator")
        late, out = _pop_beside("hr", 1)
        late.join(30)
        assert not late.is_alive(), "the pop waited for the row the cancel holds"
    assert [[task.data["org"] for task in tasks] for tasks in out] == [["c"]]
    second = services.task_pop(scheduler_id="hr", limit=1, worker="w")
    assert [task.data["org"] for task in second] == ["d"]
    assert services.task_pop(scheduler_id="hr", limit=1, worker="w") == []
    assert Task.objects.get(scheduler_id="hr", data__org="e").status == TaskStatus.QUEUED
    running = Task.objects.filter(scheduler_id="hr", status__in=LEASED_STATUSES)
    assert sorted(running.values_list("concurrency_value", flat=True)) == ["a", "c", "d"]
    assert not TaskEvent.objects.filter(task_id=head.id, to_status=TaskStatus.DISPATCHED).exists()


@pytest.mark.parametrize("concurrency_key", HANDOUT_PATHS)
def test_task_pop__a_fair_pop_of_one_past_a_held_head_keeps_the_values_turn(
    concurrency_key: str,
) -> None:
    """Fair share by org: "a" has two tasks, "b" one. A cancel holds a's head: the pop of
    one takes a's next task (a's turn is kept), and the next pop is b's turn."""
    services.scheduler_create(
        id="hf", fair_key="org", concurrency_key=concurrency_key, concurrency_limit=5
    )
    seed_queued("hf", 2, data={"org": "a"}, priority=0)
    seed_queued("hf", 1, data={"org": "b"}, priority=0)
    head, second = Task.objects.filter(scheduler_id="hf", data__org="a").order_by(
        "priority", "created_at", "id"
    )
    with transaction.atomic():
        services.task_cancel(task_id=head.id, actor="operator")
        late, out = _pop_beside("hf", 1)
        late.join(30)
        assert not late.is_alive(), "the pop waited for the row the cancel holds"
    assert [[task.id for task in tasks] for tasks in out] == [[second.id]]
    after = services.task_pop(scheduler_id="hf", limit=1, worker="w")
    assert [task.data["org"] for task in after] == ["b"]
    assert services.task_pop(scheduler_id="hf", limit=1, worker="w") == []


@pytest.mark.parametrize("fair_key", HANDOUT_PATHS)
def test_scheduler_update__a_key_change_meanwhile_a_pop_keeps_the_new_keys_limit(
    fair_key: str,
) -> None:
    """A pop whose snapshot has the old key must not hand out a task that the change is
    restamping (it would count it against its old value, past the new value's limit)."""
    queue = services.scheduler_create(
        id="rk", concurrency_key="org", concurrency_limit=1, fair_key=fair_key
    )
    seed_queued("rk", 1, data={"org": "a", "team": "T"}, priority=0)
    seed_queued("rk", 1, data={"org": "b", "team": "T"}, priority=1)
    assert [t.data["org"] for t in services.task_pop(scheduler_id="rk", worker="w")] == ["a"]
    with transaction.atomic():
        services.scheduler_update(scheduler=queue, concurrency_key="team")
        late, out = _pop_beside("rk", 1)
        late.join(30)
        assert not late.is_alive(), "the pop waited for the rows the change restamps"
    running = Task.objects.filter(scheduler_id="rk", status=TaskStatus.DISPATCHED)
    assert list(running.values_list("concurrency_value", flat=True)) == ["T"]
    assert out == [[]]


@pytest.mark.parametrize("fair_key", HANDOUT_PATHS)
def test_task_pop__a_batch_beside_a_writer_of_two_queued_rows_does_not_deadlock(
    fair_key: str,
) -> None:
    """A writer that changes queued task x, then task a (as a restamp does, in id order),
    while a batch pop of the queue runs: the pop skips x instead of holding a and waiting."""
    _flow_queue_behind_a_warm_head("lo", ["a", "x"], fair_key)
    a, x = (Task.objects.get(scheduler_id="lo", data__org=org) for org in ("a", "x"))
    with transaction.atomic():
        Task.objects.filter(id=x.id).update(fair_value="z")
        late, out = _pop_beside("lo", 2)
        late.join(30)
        assert not late.is_alive(), "the pop waited for the row the writer holds"
        Task.objects.filter(id=a.id).update(fair_value="z")  # a deadlock would raise here
    assert [[task.data["org"] for task in tasks] for tasks in out] == [["a"]]


@pytest.mark.parametrize("fair_key", HANDOUT_PATHS)
@pytest.mark.parametrize("limit", [1, 2])
def test_task_pop__a_cancel_then_a_pop_in_one_transaction_beside_a_pop_does_not_deadlock(
    limit: int, fair_key: str
) -> None:
    _flow_queue_behind_a_warm_head("dl", ["a", "b"], fair_key)
    head = Task.objects.get(scheduler_id="dl", data__org="a")
    with transaction.atomic():
        services.task_cancel(task_id=head.id, actor="operator")
        late, out = _pop_beside("dl", limit)
        late.join(30)
        assert not late.is_alive(), "the other pop waited for the row the cancel holds"
        mine = services.task_pop(scheduler_id="dl", limit=limit, worker="me")
    handed = [task.data["org"] for tasks in [*out, mine] for task in tasks]
    assert handed == ["b"]


def _push_in_thread(push: Any, out: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            out.append(push())
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_until_blocked_or_done(thread: threading.Thread) -> None:
    """Until the thread waits on a lock (the fix) or has finished (nothing made it wait)."""
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        if _a_session_waits_on_a_lock():
            return
        time.sleep(0.01)


PUSHES = {
    "single": lambda: services.task_push(scheduler_id="kc", data={"org": "b", "team": "T"}),
    "batch": lambda: batches.task_push_many(
        scheduler_id="kc", pushes=[{"data": {"org": "b", "team": "T"}}]
    ),
}


def _change_key_in_the_admin(queue: Any) -> None:
    queue.concurrency_key = "team"
    form = SimpleNamespace(changed_data=["concurrency_key"])
    SchedulerAdmin(Scheduler, site).save_model(HttpRequest(), queue, form, change=True)


CHANGES = {
    "service": lambda queue: services.scheduler_update(scheduler=queue, concurrency_key="team"),
    "admin": _change_key_in_the_admin,
}


# The hot single push (one statement, its guard), a bounded queue's ORM push and the batch.
@pytest.mark.parametrize(
    ("path", "max_queue_size", "change"),
    [
        ("single", 0, "service"),
        ("single", 9, "service"),
        ("batch", 0, "service"),
        ("single", 0, "admin"),
        ("batch", 0, "admin"),
    ],
)
def test_scheduler_update__a_push_during_a_key_change_is_stamped_with_the_new_key(
    path: str, max_queue_size: int, change: str
) -> None:
    """A push that read the old key while the change restamps must not commit the old key's
    value after it: two tasks of the new value "T" would be handed out against a limit of 1."""
    queue = services.scheduler_create(
        id="kc", concurrency_key="org", concurrency_limit=1, max_queue_size=max_queue_size
    )
    services.task_push(scheduler_id="kc", data={"org": "a", "team": "T"})
    out: list[Any] = []
    with transaction.atomic():
        CHANGES[change](queue)
        pusher = _push_in_thread(PUSHES[path], out)
        _wait_until_blocked_or_done(pusher)
    pusher.join(30)
    assert not pusher.is_alive() and len(out) == 1
    stamped = Task.objects.filter(scheduler_id="kc").values_list("data__org", "concurrency_value")
    assert dict(stamped) == {"a": "T", "b": "T"}
    popped = [t for _ in range(2) for t in services.task_pop(scheduler_id="kc", worker="w")]
    assert len(popped) == 1  # one task of "T" at a time
