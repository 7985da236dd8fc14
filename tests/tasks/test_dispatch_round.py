"""A dispatch round's two halves on their fast paths: on PostgreSQL the round is one query
(tasks.queue.refill) that concurrent dispatchers cannot overfill the broker with, and its
messages are those Celery's send_task would have sent (tasks.dispatch_messages)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext

from scheduler_site.celery import app
from tasks import dispatch, services
from tasks.dispatch_messages import RUN_TASK, round_sender, send_all
from tasks.exceptions import TransitionRefused
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tests.processes import run_in_processes, shared_barrier
from tests.support.processes import database_url
from tests.support.seed import seed_queued
from tests.tasks.helpers import taken_messages

S = TaskStatus

pytestmark = pytest.mark.usefixtures("empty_broker")


# --- the messages ------------------------------------------------------------------------------

# Set per message (a fresh id, its args), or by the transport on delivery.
PER_MESSAGE_HEADERS = {"id", "root_id", "argsrepr"}
PER_MESSAGE_PROPERTIES = {"correlation_id", "delivery_tag", "argsrepr"}


@pytest.mark.django_db
def test_round_sender__messages_are_what_send_task_sends(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    make_scheduler("slow", kind="celery", handler="demo.sleep")
    [task] = [services.task_push(scheduler_id="slow", data={})]
    args = [str(task.id), 1]
    app.send_task(  # what tasks.dispatch sent before it built its rounds' messages
        RUN_TASK,
        args=args,
        ignore_result=True,
        argsrepr=repr(args),
        kwargsrepr="{}",
        queue="celery",
        headers={"scheduler": "slow"},
        soft_time_limit=120,
        time_limit=None,
    )
    task.attempts = 1
    with round_sender(
        celery_queue="celery", scheduler_id="slow", soft_time_limit=120, time_limit=None
    ) as send:
        send_all([task], send)

    old, new = taken_messages()
    assert new.decode() == old.decode()
    assert old.decode()[:2] == [args, {}]
    assert new.headers["id"] != old.headers["id"]
    assert [m.headers["root_id"] == m.headers["id"] for m in (old, new)] == [True, True]
    assert _without(new.headers, PER_MESSAGE_HEADERS) == _without(old.headers, PER_MESSAGE_HEADERS)
    assert new.headers["argsrepr"] == old.headers["argsrepr"] == repr(args)
    assert _without(new.properties, PER_MESSAGE_PROPERTIES) == _without(
        old.properties, PER_MESSAGE_PROPERTIES
    )
    assert (new.content_type, new.delivery_info) == (old.content_type, old.delivery_info)


@pytest.mark.django_db
def test_round_sender__limits_registered_on_the_task_apply_under_the_handlers(
    make_scheduler: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Options set on tasks.run_task itself (a decorator argument, task annotations) reached
    # create_task_message twice, and every message of every round failed (review).
    make_scheduler("slow", kind="celery", handler="demo.sleep")
    task = services.task_push(scheduler_id="slow", data={})
    task.attempts = 1
    app.loader.import_default_modules()  # registers tasks.run_task, as a worker's start does
    run_task = app.tasks[RUN_TASK]
    monkeypatch.setattr(run_task, "time_limit", 300)
    monkeypatch.setattr(run_task, "soft_time_limit", 200)
    monkeypatch.setattr(run_task, "expires", 3600)
    monkeypatch.setattr(run_task, "_exec_options", None)

    with round_sender(celery_queue="celery", scheduler_id="slow", soft_time_limit=120) as send:
        send_all([task], send)

    [message] = taken_messages()
    assert message.headers["timelimit"] == [300, 120]  # the task's hard limit, the handler's soft
    assert message.headers["expires"] is not None


def _without(fields: dict[str, Any], names: set[str]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if name not in names}


# --- the round in one query ----------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db
def test_dispatch_scheduler__a_plain_round_is_one_query_on_postgresql(
    make_scheduler: Callable[..., Scheduler], django_capture_on_commit_callbacks: Any
) -> None:
    make_scheduler("echo", kind="celery", handler="demo.echo", dispatch_threshold=3, paused=True)
    seed_queued("echo", 5)
    Scheduler.objects.filter(id="echo").update(paused=False)

    with (
        django_capture_on_commit_callbacks(execute=True),  # the round's sends, on commit
        CaptureQueriesContext(connection) as queries,
    ):
        assert dispatch.dispatch_scheduler("echo") == 3

    # The test runs in a transaction, so the round takes a savepoint; in autocommit it does not.
    round_trips = [q["sql"][:80] for q in queries if "SAVEPOINT" not in q["sql"]]
    assert len(round_trips) == 1, round_trips
    assert Counter(TaskEvent.objects.values_list("to_status", flat=True)) == {
        S.QUEUED: 5,
        S.DISPATCHED: 3,
    }
    assert len(taken_messages()) == 3


@pytest.mark.postgres
@pytest.mark.django_db
def test_dispatch_scheduler__server_side_binding_takes_the_orm_round(
    make_scheduler: Callable[..., Scheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A prepared statement cannot hold two statements: with server_side_binding every round
    # in one query failed (review). The ORM round serves such a connection.
    make_scheduler("echo", kind="celery", handler="demo.echo", dispatch_threshold=3)
    seed_queued("echo", 2)
    options = {**connection.settings_dict.get("OPTIONS", {}), "server_side_binding": True}
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)

    with CaptureQueriesContext(connection) as queries:
        assert dispatch.dispatch_scheduler("echo") == 2

    assert not any("set_config" in q["sql"] for q in queries)
    assert Task.objects.filter(scheduler_id="echo", status=S.DISPATCHED).count() == 2


@pytest.mark.postgres
@pytest.mark.django_db
def test_dispatch_scheduler__a_flow_controlled_queue_is_asked_once(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    # The one-query round finds a flow-controlled queue, commits nothing and hands it to the
    # ORM round; the next rounds go there at once, without that extra locked round trip.
    make_scheduler("rated", kind="celery", handler="demo.echo", rate_limit="1000/s")
    seed_queued("rated", 4)

    with CaptureQueriesContext(connection) as queries:
        dispatch.dispatch_scheduler("rated")
        dispatch.dispatch_scheduler("rated")

    # A prepared statement's run is logged without its SQL (None): the flow claim's, once
    # psycopg has prepared it (DATABASE_PREPARE_THRESHOLD, at its second run by default).
    assert sum("set_config" in (q["sql"] or "") for q in queries) == 1
    assert Task.objects.filter(scheduler_id="rated", status=S.DISPATCHED).count() == 4


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_dispatch_scheduler__a_failed_round_leaves_the_callers_transaction_usable(
    make_scheduler: Callable[..., Scheduler],
) -> None:
    make_scheduler("echo", kind="celery", handler="demo.echo")
    holder = psycopg.connect(database_url(connection.settings_dict, "postgresql"))
    try:
        holder.execute("SELECT 1 FROM tasks_scheduler WHERE id = 'echo' FOR UPDATE")
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '100ms'")
            with pytest.raises(OperationalError):
                dispatch.dispatch_scheduler("echo")  # waits on the holder's lock, times out
            # Without the round's savepoint: "current transaction is aborted".
            assert Scheduler.objects.filter(id="echo").exists()
    finally:
        holder.rollback()
        holder.close()


THRESHOLD = 10
DISPATCHERS = 8
ROUNDS = 15


def _dispatch_and_start(index: int, phase: Any) -> tuple[int, int]:
    """Each round: every process dispatches at once, then starts one DISPATCHED task (making
    room for the next round); (tasks it dispatched, most DISPATCHED it ever saw)."""
    sent = deepest = 0
    for _ in range(ROUNDS):
        phase.wait(timeout=120)
        sent += dispatch.dispatch_scheduler("conc")
        deepest = max(deepest, Task.objects.filter(status=S.DISPATCHED).count())
        for task_id, attempt in Task.objects.filter(status=S.DISPATCHED).values_list(
            "id", "attempts"
        )[:3]:
            with contextlib.suppress(TransitionRefused):
                services.task_start(task_id=task_id, actor=f"w{index}", attempt=attempt)
                break
    return sent, deepest


@pytest.mark.postgres
@pytest.mark.concurrency
@pytest.mark.django_db(transaction=True)
def test_dispatch_scheduler__concurrent_rounds_never_overfill_the_broker() -> None:
    services.scheduler_create(
        id="conc", kind="celery", handler="demo.echo", dispatch_threshold=THRESHOLD, paused=True
    )
    seed_queued("conc", 400)
    Scheduler.objects.filter(id="conc").update(paused=False)

    results = run_in_processes(
        DISPATCHERS, _dispatch_and_start, shared_barrier(DISPATCHERS), timeout=240
    )

    assert max(deepest for _, deepest in results) <= THRESHOLD
    dispatched = Counter(
        TaskEvent.objects.filter(to_status=S.DISPATCHED).values_list("task_id", flat=True)
    )
    assert sum(sent for sent, _ in results) == len(dispatched) > THRESHOLD
    assert set(dispatched.values()) == {1}, "each task dispatched once"
    assert Task.objects.filter(status=S.DISPATCHED).count() <= THRESHOLD
