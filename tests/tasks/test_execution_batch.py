"""Several tasks a Celery message (issue 12): how a dispatch round splits its tasks into
`tasks.run_task` / `tasks.run_tasks` messages, and `execution_batch.execute_batch` called
in-process on what the broker received (the worker's path minus Celery): each entry claimed at
its own turn by CAS on its attempt, stale entries skipped, the tail sent again one a message
once the batch has run WORKER_BATCH_MILLISECONDS. The broker is the real one of the test run."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import psycopg
import pytest
from django.test import override_settings

from tasks import dispatch, execution_batch, services
from tasks.dispatch_messages import RUN_TASK, RUN_TASKS, split
from tasks.execution_batch import Entry
from tasks.models import Task, TaskEvent, TaskStatus
from tasks.registry import TaskContext, register
from tasks.retry import RetrySpec
from tests.support.sessions import other_session
from tests.tasks.helpers import celery_queue, taken_messages

S = TaskStatus

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("empty_broker", "restore_handlers"),
]


def _round(scheduler_id: str, count: int, **data: Any) -> list[tuple[str, list[Any]]]:
    """Push `count` tasks to a paused queue, dispatch them in one round (committed: the
    messages are sent), and take its messages off the broker: (task name, args)."""
    services.scheduler_set_paused(scheduler_id=scheduler_id, paused=True)
    for n in range(count):
        services.task_push(scheduler_id=scheduler_id, data={"n": n, **data})
    services.scheduler_set_paused(scheduler_id=scheduler_id, paused=False)  # one round, on commit
    dispatch.dispatch_scheduler(scheduler_id)  # (none left: the resume's round sent them all)
    dispatched = Task.objects.filter(scheduler_id=scheduler_id, status=S.DISPATCHED)
    assert dispatched.count() == count
    return [(m.headers["task"], m.decode()[0]) for m in taken_messages()]


def _entries(args: list[Any]) -> list[Entry]:
    return execution_batch.parse(args[0])


def _run(entries: list[Entry]) -> list[str]:
    return execution_batch.execute_batch(
        entries, worker="test", celery_queue="celery", scheduler_id="echo"
    )


def _running_events(task_id: Any) -> int:
    return TaskEvent.objects.filter(task_id=task_id, to_status=S.RUNNING).count()


@pytest.mark.parametrize(
    ("count", "batch", "spread", "sizes"),
    [
        (0, 8, 4, []),
        (1, 8, 4, [1]),
        (5, 8, 4, [2, 1, 1, 1]),
        (25, 8, 4, [7, 6, 6, 6]),
        (50, 8, 4, [8, 7, 7, 7, 7, 7, 7]),
        (10, 1, 4, [1] * 10),
        (3, 8, 1, [3]),
    ],
)
def test_split__at_most_batch_a_message_and_never_fewer_messages_than_the_spread(
    count: int, batch: int, spread: int, sizes: list[int]
) -> None:
    tasks = [Entry(id=n, attempts=1) for n in range(count)]  # type: ignore[arg-type]

    groups = split(tasks, batch=batch, spread=spread)

    assert [len(group) for group in groups] == sizes
    assert sorted(t.id for group in groups for t in group) == list(range(count))
    # Dealt out in turn: the round's first tasks head the messages.
    assert [group[0].id for group in groups] == list(range(len(groups)))


def test_dispatch__a_round_goes_out_as_batches_and_a_time_limited_handler_one_a_message() -> None:
    celery_queue("echo", "demo.echo", dispatch_threshold=50)
    celery_queue("slow", "demo.sleep", dispatch_threshold=50)  # soft_time_limit=120

    batched = _round("echo", 20)
    single = _round("slow", 12, seconds=0)  # batched, it would be 4 messages of 3

    assert sorted(len(_entries(args)) for _, args in batched) == [5, 5, 5, 5]
    assert {name for name, _ in batched} == {RUN_TASKS}
    assert [name for name, _ in single] == [RUN_TASK] * 12


@override_settings(DISPATCH_MESSAGE_BATCH=1)
def test_dispatch__a_batch_of_one_restores_one_task_a_message() -> None:
    celery_queue("echo", "demo.echo", dispatch_threshold=50)

    assert [name for name, _ in _round("echo", 6)] == [RUN_TASK] * 6


@override_settings(DISPATCH_MESSAGE_SPREAD=1)  # the round in one message
def test_execute_batch__runs_each_entry_once_claimed_at_its_own_turn() -> None:
    celery_queue("echo", "demo.echo", dispatch_threshold=50)
    [(_, args)] = _round("echo", 3)  # spread 1: one message
    entries = _entries(args)

    assert _run(entries) == ["completed"] * 3

    tasks = [Task.objects.get(id=entry.id) for entry in entries]
    assert [(t.status, t.attempts) for t in tasks] == [(S.COMPLETED, 1)] * 3
    assert [_running_events(t.id) for t in tasks] == [1, 1, 1]
    # Each task is claimed (its DISPATCHED -> RUNNING event) no sooner than the previous one
    # reported (on PostgreSQL in the same statement as that report: at the same time).
    for done, started in itertools.pairwise(tasks):
        assert _events_at(done.id, S.COMPLETED) <= _events_at(started.id, S.RUNNING)
    for task in tasks:
        assert _events_at(task.id, S.RUNNING) <= _events_at(task.id, S.COMPLETED)


@override_settings(DISPATCH_MESSAGE_SPREAD=1)  # the round in one message
def test_execute_batch__a_redelivered_batch_runs_nothing_twice() -> None:
    celery_queue("echo", "demo.echo", dispatch_threshold=50)
    [(_, args)] = _round("echo", 3)
    entries = _entries(args)
    assert _run(entries) == ["completed"] * 3

    assert _run(entries) == ["skipped"] * 3  # the fence refuses every finished attempt

    assert [_running_events(entry.id) for entry in entries] == [1, 1, 1]


@override_settings(DISPATCH_MESSAGE_SPREAD=1)  # the round in one message
def test_execute_batch__cancelled_and_handed_back_entries_are_skipped_not_run_twice() -> None:
    celery_queue("echo", "demo.echo", dispatch_threshold=50)
    [(_, args)] = _round("echo", 3)
    cancelled, taken_back, fine = _entries(args)
    services.task_cancel(task_id=cancelled.id, actor="operator")
    # The claim timeout trips for the second: handed back, sent again, and claimed from the
    # new message before this batch reaches its stale entry.
    services.task_hand_back(
        task_id=taken_back.id, reason="claim timeout", actor="dispatcher", unclaimed_only=True
    )
    [(name, again)] = _round_sent_again("echo")
    assert name == RUN_TASK and _run(_as_entries(again)) == ["completed"]

    assert _run([cancelled, taken_back, fine]) == ["skipped", "skipped", "completed"]

    assert fresh_status(cancelled) == S.CANCELLED and _running_events(cancelled.id) == 0
    assert fresh_status(taken_back) == S.COMPLETED and _running_events(taken_back.id) == 1
    assert fresh_status(fine) == S.COMPLETED


def _round_sent_again(scheduler_id: str) -> list[tuple[str, list[Any]]]:
    dispatch.dispatch_scheduler(scheduler_id)  # (the hand-back's own fast path may have sent it)
    assert Task.objects.filter(scheduler_id=scheduler_id, status=S.DISPATCHED).count() == 2
    return [(m.headers["task"], m.decode()[0]) for m in taken_messages()]


def _as_entries(args: list[Any]) -> list[Entry]:
    """A run_task message's args as the one entry it names."""
    return execution_batch.parse([args])


def fresh_status(entry: Entry) -> str:
    return Task.objects.get(id=entry.id).status


@override_settings(WORKER_BATCH_MILLISECONDS=0, DISPATCH_MESSAGE_SPREAD=1)
def test_execute_batch__past_its_time_the_tail_is_sent_again_one_a_message() -> None:
    celery_queue("echo", "demo.echo", dispatch_threshold=50)
    [(_, args)] = _round("echo", 3)
    head, *tail = _entries(args)

    assert _run([head, *tail]) == ["completed", "resent", "resent"]

    assert [fresh_status(entry) for entry in tail] == [S.DISPATCHED] * 2
    resent = [(m.headers["task"], m.decode()[0]) for m in taken_messages()]
    # (sorted: the filesystem broker does not keep the order of messages sent together)
    assert sorted(resent) == sorted((RUN_TASK, [str(e.id), e.attempts]) for e in tail)
    for _, again in resent:  # each then runs once from its own message
        assert _run(_as_entries(again)) == ["completed"]
    assert [_running_events(entry.id) for entry in [head, *tail]] == [1, 1, 1]


# --- a report with the next entry's claim (WORKER_CLAIM_WITH_REPORT) ------------------------

# What the handlers below act on: filled by each test once its round is dispatched.
TARGETS: dict[str, Any] = {}


def _events_at(task_id: Any, to_status: str) -> Any:
    return TaskEvent.objects.get(task_id=task_id, to_status=to_status).at


@pytest.mark.postgres
@override_settings(DISPATCH_MESSAGE_SPREAD=1, WORKER_CLAIM_WITH_REPORT=True)
def test_execute_batch__a_report_and_the_next_claim_are_one_statement() -> None:
    celery_queue("echo", "demo.echo", dispatch_threshold=50)
    [(_, args)] = _round("echo", 3)
    entries = _entries(args)

    assert _run(entries) == ["completed"] * 3

    # One statement: one `now` for both events (two statements take the time twice).
    for done, started in itertools.pairwise(entries):
        assert _events_at(done.id, S.COMPLETED) == _events_at(started.id, S.RUNNING)
    assert [_running_events(entry.id) for entry in entries] == [1, 1, 1]


def _lock_one_then_the_other(one: Any, other_one: Any, errors: list[Exception]) -> None:
    """Another transaction that locks one task, then the other: as a key change's restamp
    locks the queue's active tasks, in an order of its own."""
    table = Task._meta.db_table
    first_held = threading.Event()

    def one_then_the_other() -> None:
        try:
            with other_session(autocommit=False) as other:
                other.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", [one])
                first_held.set()
                time.sleep(0.3)  # the report's statement is running by now
                other.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE", [other_one])
                other.commit()
        except psycopg.Error as exc:
            errors.append(exc)
        finally:
            first_held.set()

    TARGETS["other"] = threading.Thread(target=one_then_the_other)
    TARGETS["other"].start()
    first_held.wait(10)  # the handler returns, and the report runs, once `one` is held


@pytest.mark.postgres
@pytest.mark.parametrize(
    "next_first", [True, False], ids=["next then reported", "reported then next"]
)
@override_settings(DISPATCH_MESSAGE_SPREAD=1, WORKER_CLAIM_WITH_REPORT=True)
def test_execute_batch__rows_another_transaction_locks_meanwhile_are_no_deadlock(
    next_first: bool,
) -> None:
    errors: list[Exception] = []

    def held_meanwhile(ctx: TaskContext) -> None:
        if ctx.task_id == TARGETS["first"]:
            order = [TARGETS["next"], TARGETS["first"]]
            _lock_one_then_the_other(*(order if next_first else order[::-1]), errors)

    register("test.held_next")(held_meanwhile)
    celery_queue("q", "test.held_next", dispatch_threshold=50)
    [(_, args)] = _round("q", 2)
    first, following = _entries(args)
    TARGETS.update(first=first.id, next=following.id)

    outcomes = _run([first, following])
    other = TARGETS.pop("other")  # started by this run's handler (not an earlier test's)
    other.join()

    assert errors == []  # the other transaction was never a deadlock's victim either
    assert outcomes == ["completed", "completed"]
    assert (fresh_status(first), fresh_status(following)) == (S.COMPLETED, S.COMPLETED)
    assert _running_events(following.id) == 1


@override_settings(DISPATCH_MESSAGE_SPREAD=1, WORKER_CLAIM_WITH_REPORT=True)
def test_execute_batch__a_refused_next_claim_does_not_refuse_the_report() -> None:
    def cancel_next(ctx: TaskContext) -> None:
        if ctx.task_id == TARGETS["first"]:  # an operator cancels the next one meanwhile
            services.task_cancel(task_id=TARGETS["next"], actor="operator")

    register("test.cancel_next")(cancel_next)
    celery_queue("q", "test.cancel_next", dispatch_threshold=50)
    [(_, args)] = _round("q", 3)
    first, cancelled, last = _entries(args)
    TARGETS.update(first=first.id, next=cancelled.id)

    assert _run([first, cancelled, last]) == ["completed", "skipped", "completed"]

    assert [fresh_status(e) for e in (first, cancelled, last)] == [
        S.COMPLETED,
        S.CANCELLED,
        S.COMPLETED,
    ]
    assert _running_events(cancelled.id) == 0


@override_settings(DISPATCH_MESSAGE_SPREAD=1, WORKER_CLAIM_WITH_REPORT=True)
def test_execute_batch__a_refused_report_does_not_refuse_the_next_claim() -> None:
    def lose_own_lease(ctx: TaskContext) -> None:
        if ctx.task_id == TARGETS["first"]:  # an operator fails it meanwhile (no token)
            services.task_fail(task_id=ctx.task_id, error="stopped by hand", actor="operator")

    register("test.lose_lease", retry=RetrySpec(policy="none", dead_letter=False))(lose_own_lease)
    celery_queue("q", "test.lose_lease", dispatch_threshold=50)
    [(_, args)] = _round("q", 2)
    first, second = _entries(args)
    TARGETS["first"] = first.id

    assert _run([first, second]) == ["lost", "completed"]

    assert (fresh_status(first), fresh_status(second)) == (S.FAILED, S.COMPLETED)
    assert _running_events(second.id) == 1


@override_settings(DISPATCH_MESSAGE_SPREAD=1, WORKER_CLAIM_WITH_REPORT=True)
def test_execute_batch__a_running_entry_cancelled_stops_and_the_next_runs() -> None:
    def cancelled_while_running(ctx: TaskContext) -> None:
        if ctx.task_id == TARGETS["first"]:  # an operator cancels it while it runs
            services.task_cancel(task_id=ctx.task_id, actor="operator")
            ctx.check_cancelled()

    register("test.cancelled")(cancelled_while_running)
    celery_queue("q", "test.cancelled", dispatch_threshold=50)
    [(_, args)] = _round("q", 2)
    first, second = _entries(args)
    TARGETS["first"] = first.id

    assert _run([first, second]) == ["failed", "completed"]

    assert (fresh_status(first), fresh_status(second)) == (S.CANCELLED, S.COMPLETED)
