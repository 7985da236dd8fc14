"""Dispatch of celery queues (DESIGN 4.5): at most `dispatch_threshold` tasks in the broker,
QUEUED→DISPATCHED with an event, only due tasks of unpaused celery queues; the fast path on
commit after a push; a broker that cannot be reached hands the tasks back, attempt not spent.
The broker is the real one of the test run (filesystem, or Redis beside PostgreSQL)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from scheduler_site.celery import app
from tasks import dispatch, services
from tasks.dispatch_messages import RUN_TASK, RUN_TASKS, split
from tasks.exceptions import TransitionRefused
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tests.support.processes import database_url
from tests.tasks.helpers import T0, fresh, history, snapshot, taken_messages

S = TaskStatus
UNREACHABLE = "redis://127.0.0.1:1/0"

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_broker")]


def _reset_producer_pools() -> None:
    # What Celery itself does after a fork: the next send looks its pools up from the conf
    # (kombu keeps one pool per broker URL, so the normal broker's pool is found again).
    app._pool = None
    app.amqp._producer_pool = None


@contextlib.contextmanager
def _unreachable_broker() -> Iterator[None]:
    """Point the app's producer at a port nothing listens on: a real broker failure.
    broker_write_url, because CELERY_BROKER_URL in the environment outranks broker_url;
    max_retries 0 so kombu gives up at the first refused connection, not after its timeout."""
    keys = (
        "broker_write_url",
        "broker_connection_retry",
        "broker_connection_max_retries",
        "broker_transport_options",
        "task_publish_retry",
    )
    saved = {key: app.conf[key] for key in keys}
    try:
        app.conf.update(
            broker_write_url=UNREACHABLE,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
            broker_transport_options={
                **(saved["broker_transport_options"] or {}),
                "max_retries": 0,
            },
            task_publish_retry=False,
        )
        _reset_producer_pools()
        yield
    finally:
        app.conf.update(saved)
        _reset_producer_pools()


def _broker_messages(queue_name: str = "") -> list[tuple[str, list[Any], Any]]:
    """Take every message off a queue: (task name, args, time limits)."""
    return [
        (message.headers["task"], message.decode()[0], message.headers.get("timelimit"))
        for message in taken_messages(queue_name)
    ]


@pytest.fixture
def celery_queue(make_scheduler: Callable[..., Scheduler]) -> Scheduler:
    return make_scheduler("echo", kind="celery", handler="demo.echo", dispatch_threshold=3)


def _push(count: int, scheduler_id: str = "echo", **kwargs: Any) -> list[Task]:
    return [
        services.task_push(scheduler_id=scheduler_id, data={"n": n}, **kwargs) for n in range(count)
    ]


def _count(status: str, scheduler_id: str = "echo") -> int:
    return Task.objects.filter(scheduler_id=scheduler_id, status=status).count()


# --- dispatch_scheduler ----------------------------------------------------------------------


def test_dispatch_scheduler__fills_up_to_the_threshold_and_no_further(
    celery_queue: Scheduler,
) -> None:
    _push(10)

    assert dispatch.dispatch_scheduler("echo") == 3
    assert (_count(S.DISPATCHED), _count(S.QUEUED)) == (3, 7)

    assert dispatch.dispatch_scheduler("echo") == 0
    assert (_count(S.DISPATCHED), _count(S.QUEUED)) == (3, 7)


def test_dispatch_scheduler__a_started_task_makes_room_for_one_more(
    celery_queue: Scheduler,
) -> None:
    _push(10)
    dispatch.dispatch_scheduler("echo")
    started = Task.objects.filter(scheduler_id="echo", status=S.DISPATCHED).first()
    services.task_start(task_id=started.id, actor="w", attempt=1)

    assert dispatch.dispatch_scheduler("echo") == 1

    assert (_count(S.RUNNING), _count(S.DISPATCHED), _count(S.QUEUED)) == (1, 3, 6)
    assert dispatch.dispatch_scheduler("echo") == 0


def test_dispatch_scheduler__takes_tasks_in_queue_order(celery_queue: Scheduler) -> None:
    tasks = [
        services.task_push(scheduler_id="echo", data={"n": n}, priority=p)
        for n, p in enumerate([5, 1, 9, 0, 1])
    ]

    dispatch.dispatch_scheduler("echo")

    dispatched = set(Task.objects.filter(status=S.DISPATCHED).values_list("data__n", flat=True))
    assert dispatched == {1, 3, 4}, "lowest priority values first, then oldest"
    assert len(tasks) == 5


def test_dispatch_scheduler__leases_and_records_the_event(
    celery_queue: Scheduler, time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(T0, tick=False)
    [task] = _push(1)

    dispatch.dispatch_scheduler("echo")

    task = fresh(task)
    assert task.status == S.DISPATCHED
    assert task.attempts == 1
    assert task.worker == services.DISPATCHER
    # Until a worker claims it, the lease is the short claim timeout (a lost message must
    # not hold the threshold for a whole lease); the claim gives it the queue's lease.
    assert task.lease_expires_at == T0 + timedelta(seconds=settings.TASK_CLAIM_TIMEOUT_SECONDS)
    event = TaskEvent.objects.get(task=task, to_status=S.DISPATCHED)
    assert (event.from_status, event.actor, event.note, event.at) == (
        S.QUEUED,
        services.DISPATCHER,
        "dispatched",
        T0,
    )


def test_dispatch_scheduler__not_before_in_the_future_waits(
    celery_queue: Scheduler, time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(T0, tick=False)
    later = services.task_push(
        scheduler_id="echo", data={"n": 0}, not_before=T0 + timedelta(seconds=5)
    )
    [due] = _push(1)

    assert dispatch.dispatch_scheduler("echo") == 1
    assert (fresh(later).status, fresh(due).status) == (S.QUEUED, S.DISPATCHED)

    time_machine.move_to(T0 + timedelta(seconds=5), tick=False)
    assert dispatch.dispatch_scheduler("echo") == 1
    assert fresh(later).status == S.DISPATCHED


def test_dispatch_scheduler__paused_queue_gives_nothing(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    make_scheduler("echo", kind="celery", handler="demo.echo", paused=True)
    _push(3)
    before = snapshot()

    assert dispatch.dispatch_scheduler("echo") == 0

    assert snapshot() == before


def test_dispatch_scheduler__pull_queue_gives_nothing(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    make_scheduler("pull", kind="pull")
    _push(3, scheduler_id="pull")
    before = snapshot()

    assert dispatch.dispatch_scheduler("pull") == 0
    assert dispatch.dispatch_scheduler("no-such-queue") == 0

    assert snapshot() == before


def test_dispatch_all__covers_unpaused_celery_queues_only(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    make_scheduler("a", kind="celery", handler="demo.echo", dispatch_threshold=2)
    make_scheduler("b", kind="celery", handler="demo.echo", dispatch_threshold=5)
    make_scheduler("off", kind="celery", handler="demo.echo", paused=True)
    make_scheduler("pull", kind="pull")
    for scheduler_id in ("a", "b", "off", "pull"):
        _push(3, scheduler_id=scheduler_id)

    sent = dispatch.dispatch_all()

    assert (sent["a"], sent["b"]) == (2, 3)
    assert "off" not in sent and "pull" not in sent

    assert _count(S.QUEUED, "off") == _count(S.QUEUED, "pull") == 3


def test_pop__celery_queue_is_409_over_rest_and_nothing_changes(
    runner_client: APIClient, celery_queue: Scheduler
) -> None:
    _push(2)
    before = snapshot()

    response = runner_client.post("/api/schedulers/echo/pop/", {"limit": 1}, format="json")

    assert response.status_code == 409
    assert "celery queue" in response.json()["detail"]
    assert snapshot() == before


# --- the fast path: dispatch on commit -------------------------------------------------------


def test_push__to_a_celery_queue_dispatches_on_commit_and_sends_id_and_attempt(
    celery_queue: Scheduler, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        tasks = _push(5)

    assert (_count(S.DISPATCHED), _count(S.QUEUED)) == (3, 2)
    dispatched = set(Task.objects.filter(status=S.DISPATCHED).values_list("id", flat=True))
    sent = _broker_messages()
    assert sorted(sent) == sorted(
        ("tasks.run_task", [str(task_id), 1], [None, None]) for task_id in dispatched
    )
    assert len(tasks) == 5


def test_push__goes_to_the_schedulers_own_celery_queue(
    make_scheduler: Callable[..., Scheduler], django_capture_on_commit_callbacks: Any
) -> None:
    make_scheduler("slow", kind="celery", handler="demo.sleep", celery_queue="slow-pool")
    make_scheduler("echo", kind="celery", handler="demo.echo")  # Celery's default queue

    with django_capture_on_commit_callbacks(execute=True):
        [slow] = _push(1, scheduler_id="slow")
        [echo] = _push(1, scheduler_id="echo")

    assert _broker_messages("slow-pool") == [("tasks.run_task", [str(slow.id), 1], [None, 120])]
    assert _broker_messages() == [("tasks.run_task", [str(echo.id), 1], [None, None])]


def test_scheduler__celery_queue_defaults_to_celerys_default_queue(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    scheduler = make_scheduler("echo", kind="celery", handler="demo.echo")

    assert scheduler.celery_queue == app.conf.task_default_queue == "celery"


def test_push__handler_time_limits_travel_with_the_message(
    make_scheduler: Callable[..., Scheduler], django_capture_on_commit_callbacks: Any
) -> None:
    make_scheduler("slow", kind="celery", handler="demo.sleep")

    with django_capture_on_commit_callbacks(execute=True):
        [task] = _push(1, scheduler_id="slow")

    assert _broker_messages() == [("tasks.run_task", [str(task.id), 1], [None, 120])]


def test_push__before_commit_nothing_is_dispatched(
    celery_queue: Scheduler, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        _push(2)

    assert callbacks, "the push registered no on-commit dispatch"
    assert _count(S.DISPATCHED) == 0
    assert _broker_messages() == []


def test_push__to_a_pull_queue_sends_nothing(
    make_scheduler: Callable[..., Scheduler], django_capture_on_commit_callbacks: Any
) -> None:
    make_scheduler("pull", kind="pull")

    with django_capture_on_commit_callbacks(execute=True):
        _push(2, scheduler_id="pull")

    assert _count(S.QUEUED, "pull") == 2
    assert _broker_messages() == []


def test_resume__dispatches_what_queued_while_paused(
    make_scheduler: Callable[..., Scheduler], django_capture_on_commit_callbacks: Any
) -> None:
    make_scheduler("echo", kind="celery", handler="demo.echo", paused=True)
    with django_capture_on_commit_callbacks(execute=True):
        _push(2)
    assert _count(S.QUEUED) == 2

    with django_capture_on_commit_callbacks(execute=True):
        services.scheduler_set_paused(scheduler_id="echo", paused=False)

    assert _count(S.DISPATCHED) == 2
    assert len(_broker_messages()) == 2


# --- a broker that cannot be reached ---------------------------------------------------------


def test_push__broker_unreachable_hands_the_tasks_back_attempt_not_spent(
    celery_queue: Scheduler, django_capture_on_commit_callbacks: Any
) -> None:
    with _unreachable_broker():
        with django_capture_on_commit_callbacks() as callbacks:
            tasks = _push(2)
        for _ in range(5):  # commit rounds, bounded: a dispatch loop must fail, not hang
            with django_capture_on_commit_callbacks() as scheduled:
                for callback in callbacks:
                    callback()
            callbacks = scheduled
    assert not callbacks, "still dispatching to the broker that failed"

    for task in tasks:
        task = fresh(task)
        assert (task.status, task.attempts, task.worker) == (S.QUEUED, 0, "")
        assert task.lease_expires_at is None and task.lock_waits == 0
        steps = history(task)
        assert [(frm, to) for frm, to, _ in steps] == [
            ("", S.QUEUED),
            (S.QUEUED, S.DISPATCHED),
            (S.DISPATCHED, S.QUEUED),
        ], "handed back once, not dispatched again and again while the broker is down"
        assert "attempt not spent: broker unavailable" in steps[-1][2]

    # The broker is back: the periodic dispatcher sends them, on their first attempt.
    with django_capture_on_commit_callbacks(execute=True):
        assert dispatch.dispatch_scheduler("echo") == 2
    assert {(t.status, t.attempts) for t in Task.objects.all()} == {(S.DISPATCHED, 1)}
    assert sorted(args for _, args, _ in _broker_messages()) == sorted(
        [str(task.id), 1] for task in tasks
    )


def test_send__broker_unreachable_leaves_a_task_that_moved_on_alone(
    celery_queue: Scheduler,
) -> None:
    [task] = _push(1)
    dispatch.dispatch_scheduler("echo")
    dispatched = fresh(task)
    services.task_cancel(task_id=task.id, actor="operator")

    with _unreachable_broker():
        dispatch._send([dispatched], "demo.echo", "celery")  # refused hand-back: no error

    assert fresh(task).status == S.CANCELLED
    assert not TaskEvent.objects.filter(task=task, note__contains="broker").exists()


def test_send__broker_unreachable_leaves_a_claimed_task_running(
    celery_queue: Scheduler,
) -> None:
    # A failed batch leaves delivery uncertain: a message may have reached a worker that
    # claimed its task before the failure surfaced. Handing that task back would run it twice.
    [task] = _push(1)
    dispatch.dispatch_scheduler("echo")
    dispatched = fresh(task)
    services.task_start(task_id=task.id, actor="worker-1", attempt=dispatched.attempts)

    with _unreachable_broker():
        dispatch._send([dispatched], "demo.echo", "celery")

    task = fresh(task)
    assert (task.status, task.attempts) == (S.RUNNING, 1)
    assert not TaskEvent.objects.filter(task=task, note__contains="broker").exists()


def test_task_hand_back__unclaimed_only_refuses_a_running_task(celery_queue: Scheduler) -> None:
    [task] = _push(1)
    dispatch.dispatch_scheduler("echo")
    services.task_start(task_id=task.id, actor="worker-1", attempt=1)

    with pytest.raises(TransitionRefused, match="it is RUNNING, not DISPATCHED"):
        services.task_hand_back(task_id=task.id, reason="x", attempt=1, unclaimed_only=True)

    assert fresh(task).status == S.RUNNING


# --- the claim tells how much room the broker has; the worker refills on it ------------------


def _claim_next(scheduler_id: str = "echo") -> Task:
    task = (
        Task.objects.filter(scheduler_id=scheduler_id, status=S.DISPATCHED)
        .order_by("created_at", "id")
        .first()
    )
    assert task is not None
    return services.task_start(task_id=task.id, actor="worker-1", attempt=task.attempts)


def test_task_start__says_the_handler_and_the_room_left_in_the_broker(
    celery_queue: Scheduler,
) -> None:
    _push(5)
    assert dispatch.dispatch_scheduler("echo") == 3

    started = _claim_next()

    assert started.status == S.RUNNING
    assert (started.handler_name, started.dispatch_threshold) == ("demo.echo", 3)
    assert started.broker_room == 1  # threshold 3, two still DISPATCHED


def test_task_start__no_broker_room_for_a_pull_or_a_paused_queue(
    celery_queue: Scheduler, make_scheduler: Callable[..., Scheduler]
) -> None:
    make_scheduler("pull")
    services.task_push(scheduler_id="pull")
    (popped,) = services.task_pop(scheduler_id="pull", worker="r")
    assert services.task_start(task_id=popped.id, attempt=1).broker_room is None

    _push(2)
    dispatch.dispatch_scheduler("echo")
    services.scheduler_set_paused(scheduler_id="echo", paused=True)
    assert _claim_next().broker_room is None


def test_refill_on_claim__tops_the_broker_up_once_half_the_threshold_is_free(
    make_scheduler: Callable[..., Scheduler], django_capture_on_commit_callbacks: Any
) -> None:
    make_scheduler("refill", kind="celery", handler="demo.echo", dispatch_threshold=4)
    _push(10, scheduler_id="refill")
    dispatch.dispatch_scheduler("refill")
    _broker_messages()

    with django_capture_on_commit_callbacks(execute=True):
        dispatch.refill_on_claim(_claim_next("refill"))  # 1 of 4 free: not yet
    assert (_count(S.DISPATCHED, "refill"), _broker_messages()) == (3, [])

    with django_capture_on_commit_callbacks(execute=True):
        dispatch.refill_on_claim(_claim_next("refill"))  # 2 of 4 free: refill
    assert _count(S.DISPATCHED, "refill") == 4
    assert len(_broker_messages()) == 2
    assert (_count(S.RUNNING, "refill"), _count(S.QUEUED, "refill")) == (2, 4)


def test_task_start__no_broker_room_when_nothing_is_queued(celery_queue: Scheduler) -> None:
    # Every claim at low load would otherwise start a dispatch round with nothing to send.
    _push(2)
    dispatch.dispatch_scheduler("echo")
    assert _count(S.QUEUED) == 0

    assert _claim_next().broker_room is None


def _round_headers(queue_name: str = "") -> list[dict[str, Any]]:
    """The headers of every message on a queue, taken off it."""
    return [dict(message.headers) for message in taken_messages(queue_name)]


def test_dispatch_scheduler__every_message_of_a_round_arrives_with_its_args_shown(
    make_scheduler: Callable[..., Scheduler], django_capture_on_commit_callbacks: Any
) -> None:
    make_scheduler("echo", kind="celery", handler="demo.echo", dispatch_threshold=5)
    _push(5)
    with django_capture_on_commit_callbacks(execute=True):  # the round's sends, on commit
        assert dispatch.dispatch_scheduler("echo") == 5

    headers = _round_headers()
    tasks = Task.objects.filter(scheduler_id="echo", status=S.DISPATCHED)
    groups = split(list(tasks.order_by("priority", "created_at", "id")), batch=8, spread=4)
    expected = {_shown(group) for group in groups}
    # Four messages (the spread): one run_tasks of two, three run_task of one each.
    assert sorted(len(group) for group in groups) == [1, 1, 1, 2]
    assert {h["argsrepr"] for h in headers} == expected, "all five, each with its own args"
    assert {h["kwargsrepr"] for h in headers} == {"{}"}
    assert sorted(h["task"] for h in headers) == [RUN_TASK] * 3 + [RUN_TASKS]


def _shown(group: list[Task]) -> str:
    if len(group) == 1:
        return f"['{group[0].id}', {group[0].attempts}]"
    return repr([[[str(task.id), task.attempts] for task in group]])


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_dispatch_scheduler__skip_if_busy_leaves_a_locked_queue_to_its_dispatcher(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    make_scheduler("echo", kind="celery", handler="demo.echo", dispatch_threshold=3, paused=True)
    _push(4)  # paused: no fast path
    Scheduler.objects.filter(id="echo").update(paused=False)
    other = psycopg.connect(database_url(connection.settings_dict, "postgresql"))
    try:
        other.execute("SELECT 1 FROM tasks_scheduler WHERE id = 'echo' FOR NO KEY UPDATE")

        assert dispatch.dispatch_scheduler("echo", skip_if_busy=True) == 0  # no wait
        assert _count(S.QUEUED) == 4
    finally:
        other.rollback()
        other.close()
    assert dispatch.dispatch_scheduler("echo", skip_if_busy=True) == 3
    assert (_count(S.DISPATCHED), _count(S.QUEUED)) == (3, 1)


def _claimed(broker_room: int, threshold: int) -> Task:
    """What a worker's claim gives refill_on_claim (queue.start_dispatched's extras)."""
    task = Task(scheduler_id="echo")
    task.broker_room, task.dispatch_threshold = broker_room, threshold
    return task


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("broker_room", "waits"), [(3, True), (2, False)])
def test_refill_on_claim__the_claim_that_empties_the_broker_waits_for_a_busy_queue(
    make_scheduler: Callable[..., Scheduler], broker_room: int, waits: bool
) -> None:
    # The row is held by something that fills nothing (as an update or pause would): the
    # claim that left the broker empty must still refill it once the lock is released; a
    # claim that left tasks in the broker skips (their claims refill later).
    make_scheduler("echo", kind="celery", handler="demo.echo", dispatch_threshold=3, paused=True)
    _push(4)  # paused: no fast path
    Scheduler.objects.filter(id="echo").update(paused=False)
    other = psycopg.connect(database_url(connection.settings_dict, "postgresql"))
    other.execute("SELECT 1 FROM tasks_scheduler WHERE id = 'echo' FOR NO KEY UPDATE")
    release = threading.Timer(0.3, other.rollback)
    release.start()
    try:
        dispatch.refill_on_claim(_claimed(broker_room, threshold=3))
    finally:
        release.join()
        other.close()

    assert _count(S.DISPATCHED) == (3 if waits else 0)
