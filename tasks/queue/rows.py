"""The task rows' writes every path shares: compare-and-swap updates, inserts of QUEUED tasks
with their events, the ORM claim, and the row conversion of raw SQL results."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import QuerySet
from django.db.models.base import ModelState
from django.db.models.fields.json import KeyTransform
from django.db.models.signals import post_init, pre_init

from scheduler_site.databases import hot_rows
from tasks.models import (
    Scheduler,
    Task,
    TaskEvent,
    TaskStatus,
    is_allowed_transition,
    stamp_flow_values,
    status_writer,
)


@dataclass(frozen=True)
class Sql:
    """A raw SQL expression for an assignment, e.g. `"attempts" + 1`."""

    text: str


def _table() -> str:
    return connection.ops.quote_name(Task._meta.db_table)


def _columns() -> str:
    return ", ".join(connection.ops.quote_name(f.column) for f in Task._meta.concrete_fields)


def _assignments(values: Mapping[str, Any]) -> tuple[str, list[Any]]:
    parts: list[str] = []
    params: list[Any] = []
    for name, value in values.items():
        field = Task._meta.get_field(name)
        column = connection.ops.quote_name(field.column)
        if isinstance(value, Sql):
            parts.append(f"{column} = {value.text}")
        else:
            parts.append(f"{column} = %s")
            params.append(field.get_db_prep_save(value, connection))
    return ", ".join(parts), params


def _prep_ids(ids: Iterable[uuid.UUID]) -> list[Any]:
    pk = Task._meta.pk
    return [pk.get_db_prep_value(task_id, connection) for task_id in ids]


_CONVERTERS: list[tuple[int, list[Any], Any]] | None = None


def _converters() -> list[tuple[int, list[Any], Any]]:
    """(column index, converters, expression) of the Task fields whose raw values need one."""
    global _CONVERTERS
    if _CONVERTERS is None:
        found = []
        for index, model_field in enumerate(Task._meta.concrete_fields):
            column = model_field.get_col(Task._meta.db_table)
            funcs = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
            if funcs:
                found.append((index, funcs, column))
        _CONVERTERS = found
    return _CONVERTERS


_ATTNAMES: list[str] = []


def _attnames() -> list[str]:
    if not _ATTNAMES:
        _ATTNAMES.extend(f.attname for f in Task._meta.concrete_fields)
    return _ATTNAMES


def _built_task(alias: str, attnames: list[str], values: list[Any]) -> Task:
    """Task.from_db(alias, attnames, values) for a row of every concrete field in order,
    without Model.__init__'s walk of setattr over the fields (a fifth of a single-task pop's
    client CPU): the values go straight into the instance's dict, where __init__ puts them
    (no descriptor of a fresh instance has anything to do). __init__'s pre_init and post_init
    signals are its only other work: when something listens to them, from_db does it all."""
    # Any receiver at all (of any sender) takes from_db: has_listeners(Task) per row cost two
    # dispatcher lookups, and no receiver is connected to either signal unless a model has an
    # ImageField or a project adds one.
    if pre_init.receivers or post_init.receivers:
        return Task.from_db(alias, attnames, values)
    task = Task.__new__(Task)
    task.__dict__.update(zip(attnames, values, strict=True))
    task._state = ModelState()
    task._state.adding = False
    task._state.db = alias
    return task


def _fetch_tasks(
    sql: str,
    params: Sequence[Any] | Mapping[str, Any],
    *,
    extras: Sequence[str] = (),
    prepared: bool = False,
) -> list[Task]:
    """Tasks from a statement returning every Task column in field order, then the `extras`
    columns (set as attributes under those names). Task.objects.raw() did the same, but read
    the cursor's description (an object per column) and rebuilt its converters on every call:
    most of a claim's Python time. `prepared`: a fixed statement text run on every pop, claim
    or report, which PostgreSQL may then keep planned (see prepared_cursor)."""
    attnames = _attnames()
    db = connections[DEFAULT_DB_ALIAS]  # the `connection` proxy costs a lookup per use
    if prepared:
        rows = hot_rows(sql, params, db=db)
    else:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
    converters = _converters()
    tasks = []
    for row in rows:
        values = list(row)
        for index, funcs, column in converters:
            for func in funcs:
                values[index] = func(values[index], column, db)
        task = _built_task(db.alias, attnames, values[: len(attnames)])
        for name, value in zip(extras, values[len(attnames) :], strict=True):
            setattr(task, name, value)
        tasks.append(task)
    return tasks


def _update_returning(
    values: Mapping[str, Any],
    where_sql: str,
    where_params: Sequence[Any],
    *,
    with_sql: str = "",
    with_params: Sequence[Any] = (),
) -> list[Task]:
    set_sql, set_params = _assignments(values)
    sql = f"{with_sql}UPDATE {_table()} SET {set_sql} WHERE {where_sql} RETURNING {_columns()}"
    return _fetch_tasks(sql, [*with_params, *set_params, *where_params])


def cas_update(
    *,
    task_ids: Sequence[uuid.UUID],
    expected: str,
    values: Mapping[str, Any],
    expected_attempts: int | None = None,
    expected_token: str | None = None,
) -> list[Task]:
    """Apply `values` to those of `task_ids` still in `expected` (and, when given, on
    `expected_attempts` and held with `expected_token`); return the rows changed."""
    if "status" in values:
        _check_transition(expected, values["status"])
    if not task_ids:
        return []
    placeholders = ", ".join(["%s"] * len(task_ids))
    status_col = connection.ops.quote_name("status")
    where = f"{connection.ops.quote_name('id')} IN ({placeholders}) AND {status_col} = %s"
    params: list[Any] = [*_prep_ids(task_ids), expected]
    if expected_attempts is not None:
        # The attempt number fences a stale holder out: after a lease expiry and a new pop
        # the status is DISPATCHED again, but the attempt count has moved on.
        where += f" AND {connection.ops.quote_name('attempts')} = %s"
        params.append(expected_attempts)
    if expected_token is not None:
        # The lease token proves the caller is the current holder, whatever requeues reset
        # the attempt count in between: each hand-out mints a new one.
        where += f" AND {connection.ops.quote_name('lease_token')} = %s"
        params.append(expected_token)
    return _update_returning(values, where, params)


def _check_transition(from_status: str, to_status: Any) -> None:
    """The queue's own guard: no statement here moves a task along an edge the table lacks
    (the callers check first and refuse with a clear message; this is the backstop)."""
    if not is_allowed_transition(from_status, to_status):
        raise ValueError(f"not in ALLOWED_TRANSITIONS: {from_status} -> {to_status}")


def insert_queued(tasks: Sequence[Task], *, actor: str, note: str, at: datetime) -> list[Task]:
    """Insert new QUEUED tasks in one statement, with their events: the orchestrator's tick
    and any other batch producer (a push of one is `tasks.services.task_push`)."""
    if any(task.status != TaskStatus.QUEUED for task in tasks):
        raise ValueError("insert_queued inserts QUEUED tasks only")
    with status_writer():
        created = Task.objects.bulk_create(tasks)
    record_events(created, from_status="", actor=actor, note=note, at=at)
    return created


def insert_queued_new(
    tasks: Sequence[Task], *, actor: str, note: str, at: datetime
) -> set[uuid.UUID]:
    """Insert new QUEUED tasks in one statement, skipping any whose hash an active task of its
    scheduler already holds (the partial unique index: ON CONFLICT DO NOTHING), with events
    for those inserted; the ids inserted."""
    if not tasks:
        return set()
    if any(task.status != TaskStatus.QUEUED for task in tasks):
        raise ValueError("insert_queued_new inserts QUEUED tasks only")
    with status_writer():
        Task.objects.bulk_create(tasks, ignore_conflicts=True)
    ids = [task.id for task in tasks]
    created = set(Task.objects.filter(id__in=ids).values_list("id", flat=True))
    record_events(
        [task for task in tasks if task.id in created],
        from_status="",
        actor=actor,
        note=note,
        at=at,
    )
    return created


def _push_sql() -> str:
    q = connection.ops.quote_name
    n = _names()
    fields = [f for f in Task._meta.concrete_fields if f.attname != "status"]
    columns = ", ".join(q(f.column) for f in fields)
    # INSERT … SELECT, not VALUES, so the guard can hold the row back; in a SELECT list an
    # untyped parameter (a NULL, a text literal) would be text, so each one is cast to its
    # column's type (without a length: the assignment still refuses a value too long).
    values = ", ".join(f"CAST(%({f.attname})s AS {_cast_type(f)})" for f in fields)
    # `fresh`: the scheduler is still of the kind and unbounded (the caller's copy may be one
    # kept from an earlier push: tasks.services), and has the keys the task was stamped from,
    # under FOR KEY SHARE. A key change holds the row FOR UPDATE while it restamps the active
    # tasks (tasks.services.scheduler_update): a push that read the keys before it waits here, then
    # finds them changed and inserts nothing (fresh 0: the service reads the keys again).
    # Without it that task would keep the old key's value, which no restamp sees.
    # ON CONFLICT DO NOTHING (no target: any unique index) turns a duplicate active hash or
    # schedule into no row, rather than an error that would need a savepoint around it. The
    # event comes from what the INSERT returned, and the NOTIFY (woken is referenced, so it
    # runs) is sent only for an inserted row, all in the one statement's transaction.
    return f"""
        WITH fresh AS (
            SELECT 1 FROM {n["scheduler"]} WHERE id = %(scheduler_id)s
            AND kind = %(scheduler_kind)s AND max_queue_size = 0
            AND concurrency_key IS NOT DISTINCT FROM %(flow_concurrency_key)s
            AND fair_key IS NOT DISTINCT FROM %(flow_fair_key)s
            FOR KEY SHARE
        ), inserted AS (
            INSERT INTO {n["task"]} ({q("status")}, {columns})
            SELECT 'QUEUED', {values} FROM fresh
            ON CONFLICT DO NOTHING RETURNING id
        ), events AS (
            INSERT INTO {n["event"]} (task_id, from_status, to_status, at, actor, note)
            SELECT id, '', 'QUEUED', %(event_at)s, %(actor)s, %(note)s FROM inserted
        ), woken AS (
            SELECT pg_notify(%(channel)s, %(scheduler_id)s) FROM inserted
            WHERE %(channel)s <> ''
        )
        SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM woken),
            (SELECT count(*) FROM fresh)
    """


def _cast_type(field: Any) -> str:
    return re.sub(r"\(\d+\)$", "", field.db_type(connection))


class StaleFlowKeys(Exception):
    """The push's scheduler changed its concurrency_key or fair_key, its kind or its bound
    (or is gone) since it was read: read it again and push again (insert_one_queued)."""


def insert_one_queued(
    task: Task, *, actor: str, note: str, at: datetime, wake_channel: str = ""
) -> bool:
    """PostgreSQL only: insert one new QUEUED task with its event, and NOTIFY `wake_channel`
    (when given) with its scheduler id, in one statement that commits by itself (outside an
    atomic block); False (and nothing written) if an active task already holds its hash or
    schedule. StaleFlowKeys (nothing written) if the scheduler it holds has other flow keys,
    another kind or a bound now. Two round trips fewer than the ORM's insert and event, and
    no savepoint."""
    if task.status != TaskStatus.QUEUED:
        raise ValueError("insert_one_queued inserts QUEUED tasks only")
    stamp_flow_values([task], from_cache=True)  # the statement's guard re-checks the keys
    params = {
        f.attname: f.get_db_prep_save(getattr(task, f.attname), connection)
        for f in Task._meta.concrete_fields
        if f.attname != "status"
    }
    params |= {"event_at": _prep("modified_at", at), "actor": actor[:200], "note": note}
    params["channel"] = wake_channel
    params["flow_concurrency_key"] = task.scheduler.concurrency_key
    params["flow_fair_key"] = task.scheduler.fair_key
    params["scheduler_kind"] = task.scheduler.kind
    [(inserted, _woken, fresh)] = hot_rows(_hot_sql("push", _push_sql), params)
    if not fresh:
        raise StaleFlowKeys(task.scheduler_id)
    if inserted:
        task._state.adding = False
        task._state.db = connection.alias
    return bool(inserted)


# Which of a task's unique constraints an IntegrityError broke, by what it means to a caller:
# PostgreSQL names the index (the driver's diagnostics); SQLite names its columns.
ACTIVE_HASH = "hash"
ACTIVE_SCHEDULE = "schedule"
_CONSTRAINT_MEANING = {
    "task_active_hash_uniq": ACTIVE_HASH,
    "task_active_schedule_uniq": ACTIVE_SCHEDULE,
}


def active_conflict(exc: Exception) -> str | None:
    """ACTIVE_HASH or ACTIVE_SCHEDULE when `exc` is the unique violation of an active task's
    hash or schedule; None for any other integrity error (a foreign key, a check, another
    index), which a caller must not report as a duplicate."""
    cause = exc.__cause__
    diag = getattr(cause, "diag", None)
    if diag is not None:  # psycopg
        if getattr(cause, "sqlstate", None) != "23505":
            return None
        return _CONSTRAINT_MEANING.get(diag.constraint_name or "")
    message = str(exc)
    if not message.startswith("UNIQUE constraint failed:"):
        return None
    table = Task._meta.db_table
    columns = {part.strip() for part in message.split(":", 1)[1].split(",")}
    if columns == {f"{table}.scheduler_id", f"{table}.hash"}:
        return ACTIVE_HASH
    if columns == {f"{table}.schedule_id"}:
        return ACTIVE_SCHEDULE
    return _CONSTRAINT_MEANING.get(message.split("index", 1)[-1].strip(" '"))


def new_lease_token() -> Sql:
    """A fresh lease token for each row an UPDATE hands out: 64 hex digits from the database's
    strong random source (PostgreSQL: two gen_random_uuid(), 244 random bits; SQLite:
    randomblob, 256 bits). Minted in SQL, so a batch pop gives every task its own."""
    if connection.vendor == "postgresql":
        return Sql("replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')")
    return Sql("lower(hex(randomblob(32)))")


def data_filter(queryset: QuerySet[Task], filters: Mapping[str, Any]) -> QuerySet[Task]:
    """Equality (or one-of, for a list) on keys of `data`; dotted keys reach into objects.

    KeyTransform rather than `data__<key>` keyword lookups, so a key named like a lookup
    ("contains", "in") is still a key; it compiles right on PostgreSQL and SQLite alike.
    """
    for position, (path, wanted) in enumerate(sorted(filters.items())):
        expression: Any = "data"
        for key in path.split("."):
            expression = KeyTransform(key, expression)
        alias = f"data_filter_{position}"
        queryset = queryset.alias(**{alias: expression})
        lookup = f"{alias}__in" if isinstance(wanted, list) else alias
        queryset = queryset.filter(**{lookup: wanted})
    return queryset


def claim_queued(
    *,
    scheduler_id: str,
    limit: int,
    now: datetime,
    values: Mapping[str, Any],
    filters: Mapping[str, Any] | None = None,
) -> list[Task]:
    """Flip up to `limit` due QUEUED tasks of a scheduler to the state in `values`, in queue
    order (priority, created_at, id). Must run inside a transaction."""
    _check_transition(TaskStatus.QUEUED, values["status"])
    candidates = Task.objects.filter(
        scheduler_id=scheduler_id, status=TaskStatus.QUEUED, not_before__lte=now
    ).exclude(expires_at__lte=now)  # an expired task is never handed out (the reaper ends it)
    if filters:
        candidates = data_filter(candidates, filters)
    candidates = candidates.order_by("priority", "created_at", "id").values("id")[:limit]
    if connection.features.has_select_for_update_skip_locked:
        candidates = candidates.select_for_update(skip_locked=True)
    inner_sql, inner_params = candidates.query.sql_with_params()
    pk = connection.ops.quote_name("id")
    status_col = connection.ops.quote_name("status")
    # The candidates are picked once, in a materialised CTE. As `id IN (subquery)` PostgreSQL
    # may plan a nested-loop semi-join that re-runs the subquery for each row; every re-run
    # skips the rows this UPDATE already changed and locks `limit` more, so a pop of 1 took
    # every due task. (SQLite >= 3.35, already needed for RETURNING, reads MATERIALIZED too.)
    with_sql = f"WITH picked AS MATERIALIZED ({inner_sql}) "
    # The status test again outside the subquery: on SQLite nothing locks the chosen rows, and
    # on PostgreSQL it is what keeps a re-checked row from being claimed twice.
    where = f"{pk} IN (SELECT {pk} FROM picked) AND {status_col} = %s"
    rows = _update_returning(
        values, where, [TaskStatus.QUEUED], with_sql=with_sql, with_params=inner_params
    )
    rows.sort(key=lambda task: (task.priority, task.created_at, str(task.id)))
    return rows


# PostgreSQL runs data-modifying CTEs: there a pop, a worker's claim and its report are one
# statement each. SQLite cannot, and runs the same steps in one IMMEDIATE transaction


ONE_STATEMENT_WRITES = connection.vendor == "postgresql"


_HOT_SQL: dict[str, str] = {}  # statement texts, built once (they quote the table names)


def _hot_sql(name: str, build: Any) -> str:
    if name not in _HOT_SQL:
        _HOT_SQL[name] = build()
    return _HOT_SQL[name]


def record_events(
    tasks: Iterable[Task], *, from_status: str, actor: str, note: str, at: datetime
) -> None:
    TaskEvent.objects.bulk_create(
        [
            TaskEvent(
                task_id=task.id,
                from_status=from_status,
                to_status=task.status,
                at=at,
                actor=actor[:200],
                note=note,
            )
            for task in tasks
        ]
    )


def _returned(alias: str) -> str:
    q = connection.ops.quote_name
    return ", ".join(f"{alias}.{q(f.column)}" for f in Task._meta.concrete_fields)


def _names() -> dict[str, str]:
    q = connection.ops.quote_name
    return {
        "task": q(Task._meta.db_table),
        "event": q(TaskEvent._meta.db_table),
        "scheduler": q(Scheduler._meta.db_table),
    }


def _prep(field_name: str, value: Any) -> Any:
    return Task._meta.get_field(field_name).get_db_prep_save(value, connection)
