"""The Celery app's task_prerun hook: connections are kept across tasks, with no health-check
round trip before each, but one that failed or outlived CONN_MAX_AGE is dropped."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.db import connection

from scheduler_site.celery import _recycle_old_connections, app


@pytest.fixture
def open_connection() -> Iterator[None]:
    connection.ensure_connection()
    connection.close_at = None  # within CONN_MAX_AGE (SQLite's 0 would expire it at once)
    yield
    connection.errors_occurred = False
    connection.close_at = None


@pytest.mark.django_db(transaction=True)
def test_recycle_old_connections__keeps_a_healthy_connection_without_a_query(
    open_connection: None,
) -> None:
    raw = connection.connection
    queries = []

    with connection.execute_wrapper(lambda execute, *args: queries.append(args) or execute(*args)):
        _recycle_old_connections()

    assert connection.connection is raw
    assert queries == []
    # Django's own close_old_connections() would clear this, so that the next query first
    # runs a `SELECT 1` round trip.
    assert connection.health_check_done


@pytest.mark.django_db(transaction=True)
def test_recycle_old_connections__drops_one_past_its_max_age(open_connection: None) -> None:
    connection.close_at = time.monotonic() - 1

    _recycle_old_connections()

    assert connection.connection is None


@pytest.mark.postgres  # a SQLite file has no server to go away (its is_usable() is always true)
@pytest.mark.django_db(transaction=True)
def test_recycle_old_connections__drops_one_that_failed_and_is_unusable(
    open_connection: None,
) -> None:
    connection.connection.close()  # what a database restart leaves behind
    connection.errors_occurred = True

    _recycle_old_connections()

    assert connection.connection is None


@pytest.mark.django_db(transaction=True)
def test_recycle_old_connections__drops_one_left_out_of_autocommit(open_connection: None) -> None:
    # Found in review: otherwise the next tasks' claims and reports would run in a
    # transaction that never commits.
    connection.set_autocommit(False)

    _recycle_old_connections()

    assert connection.connection is None
    assert connection.get_autocommit()  # a fresh connection, as configured


@pytest.mark.parametrize(
    "task_name",
    [
        "schedules.orchestrate",
        "tasks.dispatch",
        "tasks.reap_expired_leases",
        "tasks.prune_finished_tasks",
        "tasks.queue_stats_rollup",
        "pilots.start_cycle",
    ],
)
def test_router__system_jobs_go_to_the_system_queue(task_name: str) -> None:
    route = app.amqp.router.route({}, task_name)

    assert route["queue"].name == settings.CELERY_SYSTEM_QUEUE == "system"


def test_router__a_task_sent_without_a_queue_goes_to_celerys_default() -> None:
    assert app.amqp.router.route({}, "tasks.run_task")["queue"].name == "celery"
    assert app.amqp.router.route({"queue": "slow"}, "tasks.run_task")["queue"].name == "slow"


def test_worker_without_q__consumes_the_default_and_system_queues() -> None:
    assert set(app.amqp.queues.consume_from) == {"celery", "system"}
