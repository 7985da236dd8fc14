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
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import QuerySet
from django.db.models.fields.json import KeyTransform

from tasks.models import Task, TaskEvent, TaskStatus


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
    return list(Task.objects.raw(sql, [*with_params, *set_params, *where_params]))


def cas_update(
    *,
    task_ids: Sequence[uuid.UUID],
    expected: str,
    values: Mapping[str, Any],
    expected_attempts: int | None = None,
) -> list[Task]:
    """Apply `values` to those of `task_ids` still in `expected`; return the rows changed."""
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
    return _update_returning(values, where, params)


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


# PostgreSQL runs data-modifying CTEs: there a pop is one statement. SQLite cannot, and pops
# through claim_queued + record_events in one IMMEDIATE transaction instead; the test suite
# runs both paths (one per database leg).
ONE_STATEMENT_POP = connection.vendor == "postgresql"


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
    return f"""
        WITH queue AS (
            SELECT s.id, s.lease_seconds FROM {scheduler} s
            WHERE s.id = %(scheduler)s AND NOT s.paused AND s.kind = 'pull'
        ), picked AS MATERIALIZED (
            SELECT t.id FROM {task} t
            WHERE t.scheduler_id = %(scheduler)s AND t.status = 'QUEUED'
                AND t.not_before <= %(now)s AND EXISTS (SELECT 1 FROM queue)
            ORDER BY t.priority, t.created_at, t.id
            LIMIT %(limit)s FOR UPDATE OF t SKIP LOCKED
        ), popped AS (
            UPDATE {task} t SET status = 'DISPATCHED', attempts = t.attempts + 1,
                lease_expires_at = %(now)s + make_interval(secs => queue.lease_seconds),
                worker = %(worker)s, modified_at = %(now)s
            FROM queue
            WHERE t.id IN (SELECT id FROM picked) AND t.status = 'QUEUED'
            RETURNING {returned}
        ), events AS (
            INSERT INTO {event} (task_id, from_status, to_status, at, actor, note)
            SELECT id, 'QUEUED', 'DISPATCHED', %(now)s, %(worker)s, 'popped' FROM popped
        )
        SELECT * FROM popped ORDER BY priority, created_at, id
    """


_POP_SQL: str | None = None


def pop_in_one_statement(
    *, scheduler_id: str, limit: int, now: datetime, worker: str
) -> list[Task]:
    """PostgreSQL only: claim up to `limit` due tasks of an unpaused pull scheduler and write
    their events, in one statement (no transaction block needed). [] says nothing about why."""
    global _POP_SQL
    if _POP_SQL is None:
        _POP_SQL = _pop_sql()
    params = {"scheduler": scheduler_id, "now": now, "limit": limit, "worker": worker}
    return list(Task.objects.raw(_POP_SQL, params))


def lease_expired_ids(*, now: datetime, limit: int) -> list[uuid.UUID]:
    candidates = Task.objects.filter(
        status__in=[TaskStatus.DISPATCHED, TaskStatus.RUNNING], lease_expires_at__lt=now
    ).order_by("lease_expires_at")
    if connection.features.has_select_for_update_skip_locked:
        candidates = candidates.select_for_update(skip_locked=True)
    return list(candidates.values_list("id", flat=True)[:limit])


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
