"""The queue's SQL, in one place.

Every status change is an `UPDATE … WHERE id … AND status = <expected> RETURNING *`: a
compare-and-swap, so two callers racing for one row cannot both win. Pop selects its rows with
`FOR UPDATE SKIP LOCKED` on PostgreSQL inside the same statement, so N poppers never get the same
task and never wait on each other. SQLite ignores row locks; there the IMMEDIATE transaction
(see scheduler_site.databases) makes the statement run with the write lock held.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import QuerySet
from django.db.models.fields.json import KeyTransform

from scheduler_site.databases import prepared_cursor
from tasks.models import (
    FlowHandout,
    FlowState,
    Scheduler,
    Task,
    TaskEvent,
    TaskStatus,
    is_allowed_transition,
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
    attnames = [f.attname for f in Task._meta.concrete_fields]
    with prepared_cursor() if prepared else connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    converters = _converters()
    tasks = []
    for row in rows:
        values = list(row)
        for index, funcs, column in converters:
            for func in funcs:
                values[index] = func(values[index], column, connection)
        task = Task.from_db(connection.alias, attnames, values[: len(attnames)])
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
    )
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
# instead; the test suite runs both paths (one per database leg).
ONE_STATEMENT_WRITES = connection.vendor == "postgresql"


def _pop_sql() -> str:
    q = connection.ops.quote_name
    task, event = q(Task._meta.db_table), q(TaskEvent._meta.db_table)
    scheduler = q(Task._meta.get_field("scheduler").related_model._meta.db_table)
    returned = ", ".join(f"t.{q(f.column)}" for f in Task._meta.concrete_fields)
    # picked filters on the constant scheduler id (not a join with `queue`) so the planner walks
    # task_queue_idx in order and stops at LIMIT; the uncorrelated EXISTS is evaluated once.
    # picked is MATERIALIZED so its LIMIT and SKIP LOCKED apply once (as `id IN (subquery)`
    # the planner may re-run it per row and claim far more than `limit`). The UPDATE re-checks
    # QUEUED: the compare-and-swap. The event rows come from what the UPDATE returned, in the
    # same statement, so a pop and its events commit or fail together.
    # A flow-controlled queue (rate, concurrency or fair key) is not this statement's: its
    # hand-outs take tasks.flow's path, which the empty answer leads to.
    return f"""
        WITH queue AS (
            SELECT s.id, s.lease_seconds FROM {scheduler} s
            WHERE s.id = %(scheduler)s AND NOT s.paused AND s.kind = 'pull'
                AND s.rate_limit = '' AND s.concurrency_key = '' AND s.fair_key = ''
        ), picked AS MATERIALIZED (
            SELECT t.id FROM {task} t
            WHERE t.scheduler_id = %(scheduler)s AND t.status = 'QUEUED'
                AND t.not_before <= %(now)s AND EXISTS (SELECT 1 FROM queue)
            ORDER BY t.priority, t.created_at, t.id
            LIMIT %(limit)s FOR UPDATE OF t SKIP LOCKED
        ), popped AS (
            UPDATE {task} t SET status = 'DISPATCHED', attempts = t.attempts + 1,
                lease_expires_at = %(now)s + make_interval(secs => queue.lease_seconds),
                worker = %(worker)s, modified_at = %(now)s, lease_token = {new_lease_token().text}
            FROM queue
            WHERE t.id IN (SELECT id FROM picked) AND t.status = 'QUEUED'
            RETURNING {returned}
        ), events AS (
            INSERT INTO {event} (task_id, from_status, to_status, at, actor, note)
            SELECT id, 'QUEUED', 'DISPATCHED', %(now)s, %(worker)s, 'popped' FROM popped
        )
        SELECT * FROM popped ORDER BY priority, created_at, id
    """


_HOT_SQL: dict[str, str] = {}  # statement texts, built once (they quote the table names)


def _hot_sql(name: str, build: Any) -> str:
    if name not in _HOT_SQL:
        _HOT_SQL[name] = build()
    return _HOT_SQL[name]


def pop_in_one_statement(
    *, scheduler_id: str, limit: int, now: datetime, worker: str
) -> list[Task]:
    """PostgreSQL only: claim up to `limit` due tasks of an unpaused pull scheduler and write
    their events, in one statement (no transaction block needed). [] says nothing about why."""
    params = {"scheduler": scheduler_id, "now": now, "limit": limit, "worker": worker}
    return _fetch_tasks(_hot_sql("pop", _pop_sql), params, prepared=True)


def lease_expired_ids(*, now: datetime, limit: int) -> list[uuid.UUID]:
    candidates = Task.objects.filter(
        status__in=[TaskStatus.DISPATCHED, TaskStatus.RUNNING], lease_expires_at__lt=now
    ).order_by("lease_expires_at")
    if connection.features.has_select_for_update_skip_locked:
        candidates = candidates.select_for_update(skip_locked=True)
    return list(candidates.values_list("id", flat=True)[:limit])


def unclaimed_expired(*, now: datetime, limit: int) -> list[Task]:
    """DISPATCHED tasks of celery queues past their claim timeout (the dispatch lease), oldest
    first; through task_lease_idx, so the periodic dispatcher's check costs O(expired)."""
    return list(
        Task.objects.filter(
            status=TaskStatus.DISPATCHED,
            lease_expires_at__lt=now,
            scheduler__kind="celery",
        ).order_by("lease_expires_at")[:limit]
    )


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


# --- the worker's hot path: claim and report in one statement each -------------------------
#
# A Celery worker runs every task through a claim (DISPATCHED -> RUNNING) and a report
# (-> COMPLETED). Through the ORM these were a read, a transaction, the CAS and an event insert
# each: most of a no-op task's cost. On PostgreSQL each is one statement of data-modifying CTEs
# (the CAS and its event commit together, in autocommit); SQLite runs the same steps in one
# IMMEDIATE transaction. Both return None when the compare-and-swap matched nothing; the caller
# then reads the task to say why.


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


def _start_sql() -> str:
    # The lease is the scheduler's, so the UPDATE joins it; its handler comes back with the
    # row, sparing the worker a second read. attempts = COALESCE(...) is the fence: a caller
    # that names an attempt only claims that one.
    # broker_room says whether the claim should top the broker up: the room left under the
    # threshold of an unpaused celery queue, once at least half of it is free and something
    # is QUEUED to fill it with; NULL otherwise (pull queues are not counted: their DISPATCHED
    # tasks may be many). The final SELECT sees the snapshot from before the UPDATE, where
    # this task still counts as DISPATCHED, hence the + 1; the nested CASE looks for QUEUED
    # tasks only when there is room. A worker's claim mints the lease token (the dispatcher
    # handed the task to the broker, not to a holder); a runner's RUNNING report keeps the
    # token its pop minted, and must show it (or be an operator's override: token NULL).
    n = _names()
    return f"""
        WITH started AS (
            UPDATE {n["task"]} t SET status = 'RUNNING', modified_at = %(now)s,
                lease_expires_at = %(now)s + make_interval(secs => s.lease_seconds),
                worker = %(actor)s,
                lease_token = CASE WHEN %(mint)s THEN {new_lease_token().text}
                    ELSE t.lease_token END
            FROM {n["scheduler"]} s
            WHERE t.id = %(id)s AND t.status = 'DISPATCHED'
                AND t.attempts = COALESCE(%(attempt)s, t.attempts)
                AND t.lease_token = COALESCE(%(token)s::text, t.lease_token)
                AND s.id = t.scheduler_id
            RETURNING {_returned("t")}, s.handler AS handler_name,
                s.dispatch_threshold AS dispatch_threshold,
                (s.kind = 'celery' AND NOT s.paused) AS dispatched_by_us
        ), events AS (
            INSERT INTO {n["event"]} (task_id, from_status, to_status, at, actor, note)
            SELECT id, 'DISPATCHED', 'RUNNING', %(now)s, %(actor)s, %(note)s FROM started
        ), room AS (
            SELECT started.dispatch_threshold + 1 - (
                SELECT count(*) FROM {n["task"]} d
                WHERE d.scheduler_id = started.scheduler_id AND d.status = 'DISPATCHED'
            ) AS free FROM started WHERE started.dispatched_by_us
        )
        SELECT {_returned("started")}, started.handler_name, started.dispatch_threshold,
            (SELECT CASE WHEN room.free >= GREATEST(1, started.dispatch_threshold / 2) THEN
                CASE WHEN EXISTS (
                    SELECT 1 FROM {n["task"]} q
                    WHERE q.scheduler_id = started.scheduler_id AND q.status = 'QUEUED'
                ) THEN room.free END
            END FROM room) AS broker_room
        FROM started
    """


def _complete_sql() -> str:
    # A runner may report COMPLETED straight from DISPATCHED, so the status it had is read
    # (and the row locked) in `previous`. The UPDATE re-checks the allowed statuses, not
    # `previous.status`: it scans the statement's snapshot, and when `previous` waited for a
    # concurrent claim (DISPATCHED -> RUNNING) the snapshot still says DISPATCHED; the
    # re-check then runs on the newest version, the one `previous` locked and read.
    n = _names()
    return f"""
        WITH previous AS MATERIALIZED (
            SELECT id, status FROM {n["task"]}
            WHERE id = %(id)s AND status IN ('DISPATCHED', 'RUNNING')
                AND attempts = COALESCE(%(attempt)s, attempts)
                AND lease_token = COALESCE(%(token)s::text, lease_token)
            FOR UPDATE
        ), completed AS (
            UPDATE {n["task"]} t SET status = 'COMPLETED', modified_at = %(now)s,
                result = %(result)s, error = '', lease_expires_at = NULL, lease_token = ''
            FROM previous
            WHERE t.id = previous.id AND t.status IN ('DISPATCHED', 'RUNNING')
                AND t.attempts = COALESCE(%(attempt)s, t.attempts)
                AND t.lease_token = COALESCE(%(token)s::text, t.lease_token)
            RETURNING {_returned("t")}, previous.status AS from_status
        ), events AS (
            INSERT INTO {n["event"]} (task_id, from_status, to_status, at, actor, note)
            SELECT id, from_status, 'COMPLETED', %(now)s, %(actor)s, %(note)s FROM completed
        )
        SELECT * FROM completed
    """


def _prep(field_name: str, value: Any) -> Any:
    return Task._meta.get_field(field_name).get_db_prep_save(value, connection)


def start_dispatched(
    *,
    task_id: uuid.UUID,
    attempt: int | None,
    lease_token: str | None,
    mint_token: bool,
    now: datetime,
    actor: str,
    note: str = "started",
) -> Task | None:
    """DISPATCHED -> RUNNING with the scheduler's lease, and its event; the task, or None if it
    was not DISPATCHED on `attempt` (and held with `lease_token`, when given). `mint_token`
    gives the task a fresh lease token (a worker's claim); else it keeps the one its pop
    minted (a runner's RUNNING report). The task also carries `handler_name` (its scheduler's
    handler), its scheduler's `dispatch_threshold`, and `broker_room`: when the broker share of
    its unpaused celery queue should be topped up (half the threshold or more free, and
    something QUEUED), the room left after this claim; else None."""
    if not ONE_STATEMENT_WRITES:
        return _start_dispatched_sqlite(
            task_id=task_id,
            attempt=attempt,
            lease_token=lease_token,
            mint_token=mint_token,
            now=now,
            actor=actor,
            note=note,
        )
    params = {
        "id": _prep("id", task_id),
        "attempt": attempt,
        "token": lease_token,
        "mint": mint_token,
        "now": _prep("modified_at", now),
        "actor": actor[:200],
        "note": note,
    }
    rows = _fetch_tasks(
        _hot_sql("start", _start_sql),
        params,
        extras=("handler_name", "dispatch_threshold", "broker_room"),
        prepared=True,
    )
    return rows[0] if rows else None


def complete_leased(
    *,
    task_id: uuid.UUID,
    attempt: int | None,
    lease_token: str | None,
    result: Any,
    now: datetime,
    actor: str,
    note: str = "completed",
) -> Task | None:
    """DISPATCHED or RUNNING -> COMPLETED with `result`, and its event; the task (with
    `from_status`), or None if it was in neither on `attempt` with `lease_token` (each
    checked when given)."""
    if not ONE_STATEMENT_WRITES:
        return _complete_leased_sqlite(
            task_id=task_id,
            attempt=attempt,
            lease_token=lease_token,
            result=result,
            now=now,
            actor=actor,
            note=note,
        )
    params = {
        "id": _prep("id", task_id),
        "attempt": attempt,
        "token": lease_token,
        "now": _prep("modified_at", now),
        "result": _prep("result", result),
        "actor": actor[:200],
        "note": note,
    }
    rows = _fetch_tasks(
        _hot_sql("complete", _complete_sql), params, extras=("from_status",), prepared=True
    )
    return rows[0] if rows else None


def _sqlite_claim(
    *,
    task_id: uuid.UUID,
    from_statuses: Sequence[str],
    attempt: int | None,
    lease_token: str | None,
    to_status: str,
    values: Mapping[str, Any],
) -> tuple[Task, str] | None:
    """Inside an IMMEDIATE transaction (the write lock is held, nothing interleaves): the CAS
    from whichever of `from_statuses` the task is in; (row, status it was in) or None."""
    current = (
        Task.objects.filter(id=task_id, status__in=from_statuses)
        .values_list("status", "attempts", "lease_token")
        .first()
    )
    if current is None or (attempt is not None and current[1] != attempt):
        return None
    if lease_token is not None and current[2] != lease_token:
        return None
    rows = cas_update(
        task_ids=[task_id],
        expected=current[0],
        values={"status": to_status, **values},
        expected_attempts=current[1],
        expected_token=current[2],
    )
    return (rows[0], current[0]) if rows else None


def _start_dispatched_sqlite(
    *,
    task_id: uuid.UUID,
    attempt: int | None,
    lease_token: str | None,
    mint_token: bool,
    now: datetime,
    actor: str,
    note: str = "started",
) -> Task | None:
    with transaction.atomic():
        scheduler = Scheduler.objects.filter(tasks__id=task_id).first()
        if scheduler is None:
            return None
        values: dict[str, Any] = {
            "modified_at": now,
            "lease_expires_at": now + timedelta(seconds=scheduler.lease_seconds),
            "worker": actor[:200],
        }
        if mint_token:
            values["lease_token"] = new_lease_token()
        claimed = _sqlite_claim(
            task_id=task_id,
            from_statuses=[TaskStatus.DISPATCHED],
            attempt=attempt,
            lease_token=lease_token,
            to_status=TaskStatus.RUNNING,
            values=values,
        )
        if claimed is None:
            return None
        task, from_status = claimed
        record_events([task], from_status=from_status, actor=actor, note=note, at=now)
        task.broker_room = _sqlite_broker_room(scheduler)
    task.handler_name = scheduler.handler
    task.dispatch_threshold = scheduler.dispatch_threshold
    return task


def _sqlite_broker_room(scheduler: Scheduler) -> int | None:
    """What the PostgreSQL claim statement's broker_room computes, in two queries."""
    if scheduler.kind != "celery" or scheduler.paused:
        return None
    in_broker = Task.objects.filter(scheduler_id=scheduler.id, status=TaskStatus.DISPATCHED).count()
    free = scheduler.dispatch_threshold - in_broker
    queued = Task.objects.filter(scheduler_id=scheduler.id, status=TaskStatus.QUEUED)
    if free >= max(1, scheduler.dispatch_threshold // 2) and queued.exists():
        return free
    return None


def _complete_leased_sqlite(
    *,
    task_id: uuid.UUID,
    attempt: int | None,
    lease_token: str | None,
    result: Any,
    now: datetime,
    actor: str,
    note: str = "completed",
) -> Task | None:
    with transaction.atomic():
        claimed = _sqlite_claim(
            task_id=task_id,
            from_statuses=[TaskStatus.DISPATCHED, TaskStatus.RUNNING],
            attempt=attempt,
            lease_token=lease_token,
            to_status=TaskStatus.COMPLETED,
            values={
                "modified_at": now,
                "result": result,
                "error": "",
                "lease_expires_at": None,
                "lease_token": "",
            },
        )
        if claimed is None:
            return None
        task, from_status = claimed
        record_events([task], from_status=from_status, actor=actor, note=note, at=now)
    task.from_status = from_status
    return task


# The statements above that write a task's status, by name: tests/tasks/test_writer.py reads
# each one's `SET status` and `WHERE … status` and proves the move against ALLOWED_TRANSITIONS.
# (cas_update and claim_queued build theirs from their arguments and check them at run time.)
STATUS_STATEMENTS: dict[str, Any] = {
    "pop": _pop_sql,
    "start": _start_sql,
    "complete": _complete_sql,
}


# --- flow control (DESIGN §9.4): the statements of tasks.flow ---------------------------------
#
# A flow-controlled scheduler hands out only through tasks.flow, which runs these inside one
# transaction that first locks the scheduler's FlowState row: its hand-outs (pops and
# dispatches alike) are serialised, so the window and active counts read next are exact.
# The plain pop above never sees such a queue.


def _flow_names() -> dict[str, str]:
    q = connection.ops.quote_name
    return {
        **_names(),
        "state": q(FlowState._meta.db_table),
        "handout": q(FlowHandout._meta.db_table),
    }


def _flow_sql(name: str) -> str:
    n = _flow_names()
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    statements = {
        "flow_state_create": f"INSERT INTO {n['state']} (scheduler_id, fair_cursor) "
        "VALUES (%s, NULL) ON CONFLICT DO NOTHING",
        "flow_state_lock": f"SELECT fair_cursor, redispatch_at_us FROM {n['state']} "
        f"WHERE scheduler_id = %s{lock}",
        "flow_state_save": f"UPDATE {n['state']} SET fair_cursor = %s, redispatch_at_us = %s "
        "WHERE scheduler_id = %s",
        # The sliding window: every hand-out batch of the last rate period, oldest first
        # (at most `count` rows, one per batch).
        "flow_window": f"SELECT at_us, count FROM {n['handout']} "
        "WHERE scheduler_id = %s AND at_us > %s ORDER BY at_us",
        "flow_window_add": f"INSERT INTO {n['handout']} (scheduler_id, at_us, count) "
        "VALUES (%s, %s, %s)",
        "flow_window_prune": f"DELETE FROM {n['handout']} WHERE scheduler_id = %s AND at_us <= %s",
        # Active tasks per concurrency value: O(active), through task_status_idx.
        "flow_active": f"SELECT concurrency_value, COUNT(*) FROM {n['task']} "
        "WHERE scheduler_id = %s AND status IN ('DISPATCHED', 'RUNNING') "
        "AND concurrency_value IS NOT NULL GROUP BY concurrency_value",
        # Fair share's next value after the cursor (>= for the first turn of a cycle): one
        # seek of task_fair_idx, whatever the number of values.
        "flow_fair_next": f"SELECT MIN(fair_value) FROM {n['task']} "
        "WHERE scheduler_id = %s AND status = 'QUEUED' AND fair_value > %s",
        "flow_fair_first": f"SELECT MIN(fair_value) FROM {n['task']} "
        "WHERE scheduler_id = %s AND status = 'QUEUED' AND fair_value >= %s",
    }
    return statements[name]


def flow_sql(name: str) -> str:
    return _hot_sql(name, lambda: _flow_sql(name))


def flow_execute(name: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Run one of the flow statements; its rows (none for a write)."""
    with connection.cursor() as cursor:
        cursor.execute(flow_sql(name), list(params))
        return cursor.fetchall() if cursor.description else []


def flow_walk_sql(*, skip_ids: int, skip_values: int, from_start: bool) -> str:
    """Blocked values crowd the queue's head: the heads of the next values after a cursor
    that are not at their limit, walking the values in order and stopping once enough are
    found (a loose index scan of task_concurrency_idx: a seek per value walked, never a row
    per task; the walk passes only the blocked values and those with nothing due). Params:
    scheduler, cursor, scheduler, [blocked values, scheduler, now, taken ids], wanted,
    scheduler, now, taken ids, blocked values, wanted."""
    n = _flow_names()
    ids = ", ".join(["%s"] * skip_ids)
    values = ", ".join(["%s"] * skip_values)
    blocked = f" AND walk.v NOT IN ({values})" if skip_values else ""
    first = ">=" if from_start else ">"
    return f"""
        WITH RECURSIVE walk(v, found) AS (
            SELECT (SELECT MIN(concurrency_value) FROM {n["task"]} WHERE scheduler_id = %s
                AND status = 'QUEUED' AND concurrency_value {first} %s), 0
            UNION ALL
            SELECT (SELECT MIN(q.concurrency_value) FROM {n["task"]} q
                    WHERE q.scheduler_id = %s AND q.status = 'QUEUED'
                        AND q.concurrency_value > walk.v),
                walk.found + CASE WHEN TRUE{blocked} AND EXISTS (
                    SELECT 1 FROM {n["task"]} e WHERE e.scheduler_id = %s
                        AND e.status = 'QUEUED' AND e.concurrency_value = walk.v
                        AND e.not_before <= %s{f" AND e.id NOT IN ({ids})" if skip_ids else ""}
                ) THEN 1 ELSE 0 END
            FROM walk WHERE walk.v IS NOT NULL AND walk.found < %s
        ), heads AS (
            SELECT walk.v, (SELECT h.id FROM {n["task"]} h
                WHERE h.scheduler_id = %s AND h.status = 'QUEUED'
                    AND h.concurrency_value = walk.v AND h.not_before <= %s
                    {f"AND h.id NOT IN ({ids})" if skip_ids else ""}
                ORDER BY h.priority, h.created_at, h.id LIMIT 1) AS head
            FROM walk WHERE walk.v IS NOT NULL{blocked}
        )
        SELECT heads.v, heads.head FROM heads WHERE heads.head IS NOT NULL
        ORDER BY heads.v LIMIT %s"""


def flow_head_sql(*, skip_ids: int, skip_values: int) -> str:
    """The head of one fair value in queue order, past the tasks this batch already took
    and those whose concurrency value is at its limit (the lists' lengths vary, so the text
    is built per call)."""
    task = connection.ops.quote_name(Task._meta.db_table)
    where = ""
    if skip_ids:
        where += f" AND id NOT IN ({', '.join(['%s'] * skip_ids)})"
    if skip_values:
        where += (
            f" AND (concurrency_value IS NULL OR concurrency_value NOT IN "
            f"({', '.join(['%s'] * skip_values)}))"
        )
    return (
        f"SELECT id, concurrency_value FROM {task} WHERE scheduler_id = %s AND status = 'QUEUED'"
        f" AND fair_value = %s AND not_before <= %s{where}"
        " ORDER BY priority, created_at, id LIMIT 1"
    )


def flow_prep_now(now: datetime) -> Any:
    return _prep("not_before", now)


def prep_ids(ids: Iterable[Any]) -> list[Any]:
    return _prep_ids(uuid.UUID(str(task_id)) for task_id in ids)


def flow_claim_ids(
    *,
    task_ids: Sequence[Any] = (),
    in_order: tuple[str, int] | None = None,
    values: Mapping[str, Any],
    actor: str,
    note: str,
    now: datetime,
    window_log: tuple[str, int, int] | None,
    cursor_save: tuple[str, str | None] | None = None,
) -> list[Task]:
    """PostgreSQL: the picked QUEUED tasks to `values` by compare-and-swap, their events and
    (`window_log`: scheduler id, now and the window's start in µs) the rate window's row and
    pruning, in one statement. The same steps as cas_update + record_events + the window
    statements, with one round trip instead of four. `in_order` (scheduler id, limit) picks
    in the same statement: the first due tasks in queue order (a queue with a rate only)."""
    _check_transition(TaskStatus.QUEUED, values["status"])
    n = _flow_names()
    set_sql, set_params = _assignments(values)
    if in_order is None:
        picked = ", ".join(["%s"] * len(task_ids))
        head, pick_params = "WITH ", prep_ids(task_ids)
    else:  # no SKIP LOCKED: the flow lock keeps other hand-outs of this queue out
        picked = "SELECT id FROM picked"
        head = (
            f"WITH picked AS MATERIALIZED (SELECT id FROM {n['task']} WHERE scheduler_id = %s "
            "AND status = 'QUEUED' AND not_before <= %s ORDER BY priority, created_at, id "
            "LIMIT %s), "
        )
        pick_params = [in_order[0], _prep("not_before", now), in_order[1]]
    sql = (
        f"{head}claimed AS (UPDATE {n['task']} SET {set_sql} "
        f"WHERE id IN ({picked}) AND status = 'QUEUED' RETURNING {_columns()}), "
        f"events AS (INSERT INTO {n['event']} (task_id, from_status, to_status, at, actor, note) "
        "SELECT id, 'QUEUED', status, %s, %s, %s FROM claimed)"
    )
    params: list[Any] = [*set_params, *pick_params, _prep("modified_at", now)]
    if in_order is not None:
        params = [*pick_params, *set_params, _prep("modified_at", now)]
    params += [actor[:200], note]
    if window_log is not None:
        scheduler_id, now_us, start_us = window_log
        sql += (
            f", logged AS (INSERT INTO {n['handout']} (scheduler_id, at_us, count) "
            "SELECT %s, %s, COUNT(*) FROM claimed HAVING COUNT(*) > 0), "
            f"pruned AS (DELETE FROM {n['handout']} WHERE scheduler_id = %s AND at_us <= %s)"
        )
        params += [scheduler_id, now_us, scheduler_id, start_us]
    if cursor_save is not None:  # fair share: where the next hand-out's turn starts
        sql += f", saved AS (UPDATE {n['state']} SET fair_cursor = %s WHERE scheduler_id = %s)"
        params += [cursor_save[1], cursor_save[0]]
    rows = _fetch_tasks(sql + " SELECT * FROM claimed", params)
    rows.sort(key=lambda task: (task.priority, task.created_at, str(task.id)))
    return rows
