"""Long-poll pops (DESIGN §9.3 `wait`): woken by LISTEN/NOTIFY on PostgreSQL with no query
while waiting, by polling on SQLite; a delayed task wakes its waiter when it falls due."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.db import connection, connections
from django.utils import timezone
from rest_framework.test import APIClient

from tasks import services, wakeups
from tasks.batches import task_push_many
from tasks.exceptions import DuplicateTask, InvalidRequest
from tasks.models import Task
from tests.support.processes import database_url

pytestmark = pytest.mark.django_db(transaction=True)


class _Waiter(threading.Thread):
    """A pop with `wait` on its own connection, counting the statements it runs."""

    def __init__(self, wait: float) -> None:
        super().__init__(daemon=True)
        self.wait, self.result, self.statements, self.took = wait, None, 0, 0.0
        self.error: BaseException | None = None

    def _count(self, execute: Any, sql: str, *args: Any) -> Any:
        self.statements += 1
        return execute(sql, *args)

    def run(self) -> None:
        started = time.monotonic()
        try:
            with connection.execute_wrapper(self._count):
                self.result = services.task_pop(scheduler_id="lp", wait=self.wait, worker="w")
        except BaseException as exc:  # reported to the test thread
            self.error = exc
        finally:
            self.took = time.monotonic() - started
            connections.close_all()


def _start(wait: float) -> _Waiter:
    waiter = _Waiter(wait)
    waiter.start()
    time.sleep(0.5)  # it is waiting now
    return waiter


def test_pop_wait__a_push_wakes_the_waiting_pop() -> None:
    services.scheduler_create(id="lp")
    waiter = _start(wait=20)

    pushed = services.task_push(scheduler_id="lp", data={"n": 1})
    waiter.join(15)

    assert waiter.error is None and not waiter.is_alive()
    assert [task.id for task in waiter.result or []] == [pushed.id]
    assert waiter.took < 10, "woken by the push, not by the end of its wait"


def test_pop_wait__nothing_due_answers_empty_after_the_wait() -> None:
    services.scheduler_create(id="lp")
    waiter = _start(wait=1.5)
    waiter.join(10)
    assert waiter.error is None and waiter.result == [] and waiter.took >= 1.5


@pytest.mark.postgres
def test_pop_wait__no_polling_query_while_waiting_on_postgresql() -> None:
    services.scheduler_create(id="lp")
    services.scheduler_create(id="other")
    waiter = _start(wait=3)
    for n in range(3):  # wake-ups for another queue: looked at, not answered
        services.task_push(scheduler_id="other", data={"n": n})
    waiter.join(10)

    assert waiter.error is None and waiter.result == []
    # LISTEN, pop, its why-empty read, next-due read, UNLISTEN, and a few more per wake-up:
    # never one every fraction of a second, as polling would (3 s of 0.2 s polls: 15+ pops).
    assert waiter.statements <= 12, waiter.statements


def test_pop_wait__a_delayed_task_wakes_its_waiter_when_due() -> None:
    services.scheduler_create(id="lp")
    due = timezone.now() + timedelta(seconds=1.5)
    task = services.task_push(scheduler_id="lp", not_before=due)
    waiter = _start(wait=20)
    waiter.join(15)
    assert [t.id for t in waiter.result or []] == [task.id]
    assert waiter.took < 10


@pytest.mark.parametrize("wait", [-1, 31, float("nan")])
def test_pop_wait__out_of_range_is_refused(wait: float) -> None:
    services.scheduler_create(id="lp")
    with pytest.raises(InvalidRequest, match="wait"):
        services.task_pop(scheduler_id="lp", wait=wait)


@pytest.mark.parametrize("wait", [-1, 31, "5", None, True])
def test_api_pop_wait__bad_values_are_400(runner_client: APIClient, wait: Any) -> None:
    services.scheduler_create(id="lp")
    response = runner_client.post("/api/schedulers/lp/pop/", {"wait": wait}, format="json")
    assert response.status_code == 400 and "wait" in response.json()
    assert not Task.objects.exists()


@pytest.mark.postgres
def test_push__notifies_only_for_a_new_task_of_a_pull_queue() -> None:
    services.scheduler_create(id="lp")
    services.scheduler_create(id="cq", kind="celery", handler="demo.echo", paused=True)
    url = database_url(connection.settings_dict, "postgresql")  # the test database
    listener = psycopg.connect(url, autocommit=True)
    listener.execute(f"LISTEN {wakeups.CHANNEL}")

    services.task_push(scheduler_id="lp", hash="h")
    with pytest.raises(DuplicateTask):
        services.task_push(scheduler_id="lp", hash="h")
    services.task_push(scheduler_id="cq")

    heard = [notice.payload for notice in listener.notifies(timeout=1)]
    listener.close()
    assert heard == ["lp"]


def _waiting(count: int) -> list[_Waiter]:
    waiters = [_Waiter(wait=20) for _ in range(count)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.8)  # each has popped nothing and waits
    return waiters


@pytest.mark.postgres
def test_pop_wait__a_push_wakes_one_waiter_of_the_process_not_all() -> None:
    services.scheduler_create(id="lp")
    waiters = _waiting(3)
    asleep = [waiter.statements for waiter in waiters]

    first = services.task_push(scheduler_id="lp")
    time.sleep(1.5)

    done = [waiter for waiter in waiters if not waiter.is_alive()]
    assert [[task.id for task in waiter.result or []] for waiter in done] == [[first.id]]
    # The other two were not woken: not one statement since they began waiting.
    still = [(waiter.statements, before) for waiter, before in zip(waiters, asleep, strict=True)]
    assert [
        now == before
        for (now, before), waiter in zip(still, waiters, strict=True)
        if waiter.is_alive()
    ] == [True, True]
    second = services.task_push(scheduler_id="lp")
    third = services.task_push(scheduler_id="lp")
    for waiter in waiters:
        waiter.join(15)
    popped = sorted(str(task.id) for waiter in waiters for task in waiter.result or [])
    assert popped == sorted(str(task.id) for task in (first, second, third))


@pytest.mark.postgres
def test_pop_wait__a_batch_wakes_as_many_waiters_as_it_queued() -> None:
    services.scheduler_create(id="lp")
    waiters = _waiting(2)

    outcomes = task_push_many(scheduler_id="lp", pushes=[{"data": {"n": n}} for n in range(2)])
    for waiter in waiters:
        waiter.join(15)

    assert all(waiter.error is None and not waiter.is_alive() for waiter in waiters)
    popped = sorted(str(task.id) for waiter in waiters for task in waiter.result or [])
    assert popped == sorted(str(outcome.task.id) for outcome in outcomes if outcome.task)
    assert all(waiter.took < 10 for waiter in waiters), "woken, not at the end of the wait"


@pytest.mark.postgres
def test_pop_wait__the_listener_reconnects_and_its_waiters_are_still_woken() -> None:
    services.scheduler_create(id="lp")
    waiters = _waiting(1)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query = %s AND pid <> pg_backend_pid()",
            [f"LISTEN {wakeups.CHANNEL}"],
        )
        assert cursor.fetchall() == [(True,)]
    time.sleep(1.5)  # reconnected (meanwhile its waiters re-check every 0.2 s)

    pushed = services.task_push(scheduler_id="lp")
    waiters[0].join(15)

    assert [task.id for task in waiters[0].result or []] == [pushed.id]
    assert waiters[0].took < 10


@pytest.mark.postgres
def test_pop_wait__resuming_a_queue_wakes_all_its_waiters() -> None:
    services.scheduler_create(id="lp", paused=True)
    pushed = [services.task_push(scheduler_id="lp", data={"n": n}) for n in range(2)]
    waiters = _waiting(2)

    services.scheduler_set_paused(scheduler_id="lp", paused=False)
    for waiter in waiters:
        waiter.join(15)

    popped = sorted(str(task.id) for waiter in waiters for task in waiter.result or [])
    assert popped == sorted(str(task.id) for task in pushed)
    assert all(waiter.took < 10 for waiter in waiters), "woken, not at the end of the wait"
