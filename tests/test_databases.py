"""The database helpers of scheduler_site/databases.py: DATABASE_PREPARE_THRESHOLD, and on
PostgreSQL that the queue's hot statements are prepared and run their generic plan while the
ORM's queries are not prepared at all."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import DataError, NotSupportedError, connection, connections, transaction
from django.db.models.signals import post_init
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from scheduler_site.databases import NATIVE_FROM_LENGTH, _to_native, hot_rows, prepare_threshold
from tasks import services
from tasks.batches import task_push_many
from tasks.models import Task
from tasks.queue.pop import _pop_sql
from tests.support.sessions import other_session


@pytest.mark.parametrize(("text", "wanted"), [("5", 5), ("0", 0), ("off", None), (" ", None)])
def test_prepare_threshold__a_number_or_off(
    monkeypatch: pytest.MonkeyPatch, text: str, wanted: int | None
) -> None:
    monkeypatch.setenv("DATABASE_PREPARE_THRESHOLD", text)
    assert prepare_threshold() == wanted


def test_prepare_threshold__anything_else_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_PREPARE_THRESHOLD", "often")
    with pytest.raises(ImproperlyConfigured, match="DATABASE_PREPARE_THRESHOLD"):
        prepare_threshold()


@pytest.mark.postgres
@pytest.mark.django_db
def test_prepared_cursor__pop_and_push_are_prepared_with_generic_plans_the_orm_is_not() -> None:
    services.scheduler_create(id="prep")
    for _ in range(8):
        services.task_push(scheduler_id="prep")
        assert len(services.task_pop(scheduler_id="prep")) == 1
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
        prepared = cursor.fetchall()
    popped = [row[1:] for row in prepared if "'popped'" in row[0]]
    # psycopg prepares it at its second run (the test settings keep the default, 1): runs 2
    # to 8 are its generic plan, none a custom one.
    assert popped == [(7, 0)]
    # The pushes ran as often, as their one hot statement: prepared too. Nothing else (the
    # ORM binds on the client): never prepared.
    others = [row[0] for row in prepared if "'popped'" not in row[0]]
    assert len(others) == 1 and "ON CONFLICT DO NOTHING" in others[0]
    services.task_cancel(task_id=services.task_push(scheduler_id="prep").id)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] == len(prepared)  # the cancel's ORM statements: none


def _fields(task: Task) -> dict[str, object]:
    return {f.attname: getattr(task, f.attname) for f in Task._meta.concrete_fields}


@pytest.mark.postgres
@pytest.mark.django_db
def test_hot_rows__a_pop_read_in_binary_equals_the_orm_row() -> None:
    services.scheduler_create(id="hot")
    data = {"n": 1, "nested": {"é": [1.5, None, True]}, "text": "a\nb"}
    pushed = services.task_push(scheduler_id="hot", data=data, priority=3)

    [popped] = services.task_pop(scheduler_id="hot", worker="w")

    stored = Task.objects.get(id=pushed.id)
    assert _fields(popped) == _fields(stored)
    assert popped.data == data
    assert (popped._state.adding, popped._state.db) == (False, "default")
    assert popped.scheduler.id == "hot"
    # Django's text loader gives the connection's tzinfo; the binary one is set to the same.
    assert popped.modified_at.tzinfo is stored.modified_at.tzinfo


@pytest.mark.django_db
def test_hot_rows__a_popped_task_is_built_by_from_db_while_init_signals_have_receivers() -> None:
    # The pop builds its Tasks without Model.__init__ (rows._built_task) only while nobody
    # listens to pre_init/post_init: a receiver must still see every popped task.
    services.scheduler_create(id="hot")
    pushed = services.task_push(scheduler_id="hot", data={"n": 1})
    seen: list[object] = []

    def receiver(sender: type, instance: Task, **_: object) -> None:
        seen.append(instance.id)

    post_init.connect(receiver, sender=Task)
    try:
        [popped] = services.task_pop(scheduler_id="hot", worker="w")
    finally:
        post_init.disconnect(receiver, sender=Task)

    assert seen == [pushed.id]
    assert popped.id == pushed.id and popped.status == "DISPATCHED"
    assert not post_init.receivers  # what the fast path checks: nothing left connected


@pytest.mark.postgres
@pytest.mark.django_db
def test_hot_rows__an_observed_connection_runs_it_through_djangos_cursor() -> None:
    services.scheduler_create(id="hot")
    services.task_push(scheduler_id="hot")

    with CaptureQueriesContext(connection) as queries:
        assert len(services.task_pop(scheduler_id="hot", worker="w")) == 1

    assert ["'popped'" in query["sql"] for query in queries.captured_queries] == [True]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_hot_rows__a_new_connection_gets_a_new_cursor() -> None:
    services.scheduler_create(id="hot")
    services.task_push(scheduler_id="hot")
    services.task_push(scheduler_id="hot")
    assert len(services.task_pop(scheduler_id="hot", worker="w")) == 1

    connection.close()

    assert len(services.task_pop(scheduler_id="hot", worker="w")) == 1


@pytest.mark.postgres
@pytest.mark.django_db
def test_hot_rows__database_errors_are_djangos() -> None:
    with pytest.raises(DataError, match="division by zero"):
        hot_rows("SELECT 1 / %(zero)s", {"zero": 0})


def _long(sql: str) -> str:
    """`sql` padded past the length psycopg caches conversions for, with a comment."""
    return sql + " -- " + "x" * NATIVE_FROM_LENGTH


@pytest.mark.postgres
@pytest.mark.django_db
def test_hot_rows__a_long_text_runs_with_native_placeholders() -> None:
    sql = _long("SELECT %(a)s::int + %(b)s::int, %(a)s::int * 2, '100%%', %(b)s::text")
    for _ in range(7):  # past the prepare threshold: the prepared statement answers alike
        assert hot_rows(sql, {"a": 2, "b": 5}) == [(7, 4, "100%", "5")]
    # It ran converted, through the RawCursor kept for such texts (not psycopg's conversion).
    assert getattr(connections["default"], "_hot_raw_cursor", None) is not None
    # The same text through Django's cursor (what an observed connection runs).
    with CaptureQueriesContext(connection):
        assert hot_rows(sql, {"a": 3, "b": 1}) == [(4, 6, "100%", "1")]


@pytest.mark.postgres
@pytest.mark.django_db
def test_hot_rows__a_long_text_with_positional_placeholders_is_psycopgs() -> None:
    assert hot_rows(_long("SELECT %s::int + 1"), [41]) == [(42,)]


def _terminate(pid: int) -> None:
    """End a backend from another session, as a server restart or a dropped proxy would."""
    with other_session() as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


def _new_request() -> None:
    """What the start of each request does to the connection (close_old_connections), which
    the test client leaves out."""
    connection.close_if_unusable_or_obsolete()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_read_as_health_check__the_token_check_is_the_requests_health_check(
    runner_client: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    services.scheduler_create(id="hc")
    checks: list[int] = []
    wrapper = type(connections["default"])
    usable = wrapper.is_usable

    def counted(self: object) -> bool:
        checks.append(1)
        return usable(self)

    monkeypatch.setattr(wrapper, "is_usable", counted)
    _new_request()
    assert runner_client.post("/api/schedulers/hc/pop/", {}, format="json").status_code == 200
    assert checks == []  # no `SELECT 1` of its own


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_read_as_health_check__a_dead_connection_is_replaced_not_a_500(
    runner_client: APIClient,
) -> None:
    services.scheduler_create(id="hc")
    services.task_push(scheduler_id="hc")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [pid] = cursor.fetchone()
    _terminate(pid)
    _new_request()
    response = runner_client.post("/api/schedulers/hc/pop/", {}, format="json")
    assert response.status_code == 200 and len(response.json()["results"]) == 1
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.parametrize("ordered", [False, True], ids=["pop of one", "batch"])
def test_pop_statement__its_generic_plan_updates_the_picked_rows_by_tid_with_a_backlog(
    ordered: bool,
) -> None:
    # The generic plan (what every prepared pop runs) cannot know LIMIT and assumes a tenth of
    # the queue: with a backlog, a join of the picked ctids with the table was planned as a
    # hash join over a sequential scan of the whole table (99 ms a pop at 300,000 queued).
    # Each statement text (a pop of one's, unordered; a batch's) has its own generic plan.
    # `ctid = ANY(ARRAY(picked))` is a TID scan whatever LIMIT is, a row fetch per pick.
    services.scheduler_create(id="tid")
    task_push_many(scheduler_id="tid", pushes=[{"data": {"n": n}} for n in range(2000)])
    text, names = _to_native(_pop_sql(ordered=ordered))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Task._meta.db_table}")
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute(f"PREPARE tid_pop AS {text}")
        limit = "100" if ordered else "1"
        arguments = {"scheduler": "'tid'", "now": "now()", "limit": limit, "worker": "'w'"}
        cursor.execute(f"EXPLAIN EXECUTE tid_pop({', '.join(arguments[n] for n in names)})")
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("DEALLOCATE tid_pop")
    update = plan[plan.index("Update on") : plan.index("Insert on")]
    assert "Tid Scan on" in update and "Seq Scan" not in update, plan
    assert "tasks_task_pkey" not in update, plan
    assert not Task.objects.exclude(status="QUEUED").exists()  # EXPLAIN alone popped nothing


@contextmanager
def _column_retyped(table: str, column: str, *, to: str, back: str) -> Iterator[None]:
    """The column's type changed by another process (`manage.py migrate` during a deploy),
    then changed back, and the test's connection closed (its prepared statements are stale)."""
    with other_session() as other:
        other.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {to}")
    try:
        yield
    finally:
        connection.close()
        with other_session() as other:
            other.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {back}")


def _popped_past_the_prepare_threshold() -> None:
    services.scheduler_create(id="mig")
    for _ in range(3):  # the push and the pop are prepared on this connection
        services.task_push(scheduler_id="mig")
        assert len(services.task_pop(scheduler_id="mig")) == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_hot_rows__a_column_type_migration_is_replanned_not_an_error() -> None:
    _popped_past_the_prepare_threshold()
    with _column_retyped("tasks_task", "priority", to="bigint", back="integer"):
        services.task_push(scheduler_id="mig", priority=3)
        [task] = services.task_pop(scheduler_id="mig")
        assert task.priority == 3
        with transaction.atomic():  # in a transaction, once replanned: prepared again
            for _ in range(3):
                services.task_push(scheduler_id="mig")
                assert len(services.task_pop(scheduler_id="mig")) == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_replanned_once__the_token_check_after_a_column_type_migration_is_not_a_500(
    runner_client: APIClient,
) -> None:
    services.scheduler_create(id="mig")
    for _ in range(3):  # past the prepare threshold: the token check is prepared
        assert runner_client.post("/api/schedulers/mig/pop/", {}, format="json").status_code == 200
    with _column_retyped("knox_authtoken", "token_key", to="varchar(64)", back="varchar(25)"):
        services.task_push(scheduler_id="mig")
        response = runner_client.post("/api/schedulers/mig/pop/", {}, format="json")
        assert response.status_code == 200 and len(response.json()["results"]) == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_hot_rows__a_stale_plan_inside_a_transaction_is_raised_and_the_rollback_clears_it() -> None:
    _popped_past_the_prepare_threshold()
    with _column_retyped("tasks_task", "priority", to="bigint", back="integer"):
        services.task_push(scheduler_id="mig")
        backend = connection.connection.info.backend_pid
        with pytest.raises(NotSupportedError, match="cached plan"), transaction.atomic():
            services.task_pop(scheduler_id="mig")
        with transaction.atomic():  # no reconnect here: the rollback cleared the statement
            assert len(services.task_pop(scheduler_id="mig")) == 1
        assert connection.connection.info.backend_pid == backend
