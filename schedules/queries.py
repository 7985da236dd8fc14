"""The orchestrator's SQL: due schedules in a policy's order, and the batched compare-and-swap
that advances their deadlines. On PostgreSQL the rows are taken with FOR UPDATE SKIP LOCKED, so
several tick runners split the due schedules between them instead of queueing on each other."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import BooleanField, Exists, OuterRef, QuerySet
from django.db.models.expressions import RawSQL

from schedules.models import Schedule, ScheduleStatus
from schedules.policies import Policy
from tasks.models import ACTIVE_STATUSES, Scheduler, Task


def _busy_condition() -> RawSQL:
    """True when the schedule has an active task, or an active task holds its hash.

    Written as `(EXISTS …) = false` on purpose: PostgreSQL turns a plain NOT EXISTS into an
    anti-join, and with stale statistics (a task table that just grew from nothing) it chose a
    nested loop that scanned every active task for each due schedule: O(due * active). This form
    stays a per-row probe of the partial unique indexes, whatever the statistics say.
    """
    q = connection.ops.quote_name
    task, schedule = q(Task._meta.db_table), q(Schedule._meta.db_table)
    active = ", ".join(f"'{status}'" for status in sorted(ACTIVE_STATUSES))
    sql = (
        f"(EXISTS (SELECT 1 FROM {task} t WHERE t.{q('schedule_id')} = {schedule}.{q('id')}"
        f" AND t.{q('schedule_id')} IS NOT NULL AND t.{q('status')} IN ({active}))"
        f" OR EXISTS (SELECT 1 FROM {task} t WHERE t.{q('scheduler_id')} = "
        f"{schedule}.{q('scheduler_id')} AND t.{q('hash')} = {schedule}.{q('hash')}"
        f" AND t.{q('hash')} IS NOT NULL AND t.{q('status')} IN ({active})))"
    )
    return RawSQL(sql, [], output_field=BooleanField())


def due_schedules(
    *,
    scheduler_id: str,
    now: datetime,
    policy: Policy,
    limit: int,
    exclude: Sequence[uuid.UUID] = (),
) -> list[Schedule]:
    """Due ACTIVE schedules of a scheduler that have no active task, in the policy's order.
    A task pushed by hand with the schedule's hash holds the slot just the same."""
    queryset = (
        Schedule.objects.filter(
            scheduler_id=scheduler_id, status=ScheduleStatus.ACTIVE, deadline_at__lte=now
        )
        .alias(busy=_busy_condition())
        .filter(busy=False)
    )
    if policy.condition is not None:
        queryset = queryset.filter(policy.condition)
    if exclude:
        queryset = queryset.exclude(id__in=list(exclude))
    queryset = queryset.order_by(*policy.order_by)
    if connection.features.has_select_for_update_skip_locked:
        queryset = queryset.select_for_update(skip_locked=True, of=("self",))
    return list(queryset[:limit])


def schedulers_with_due(*, now: datetime, scheduler_id: str | None = None) -> QuerySet[Scheduler]:
    """The unpaused schedulers that have a due schedule: the idle tick's one query. A semi-join
    probes schedule_due_idx (scheduler, deadline_at WHERE ACTIVE) once per scheduler, so it
    costs O(schedulers), never O(schedules) (a range on deadline_at alone could not use the
    index's leading column)."""
    due = Schedule.objects.filter(
        scheduler_id=OuterRef("pk"), status=ScheduleStatus.ACTIVE, deadline_at__lte=now
    )
    schedulers = Scheduler.objects.filter(Exists(due), paused=False)
    if scheduler_id:
        schedulers = schedulers.filter(id=scheduler_id)
    return schedulers.order_by("id")


def _prep(field_name: str, value: Any) -> Any:
    return Schedule._meta.get_field(field_name).get_db_prep_value(value, connection)


def _case(
    column: str, pairs: Sequence[tuple[Any, Any]], *, value_sql: str = "%s"
) -> tuple[str, list[Any]]:
    q = connection.ops.quote_name
    whens = " ".join(f"WHEN %s THEN {value_sql}" for _ in pairs)
    params = [item for pair in pairs for item in pair]
    return f"{q(column)} = CASE {q('id')} {whens} END", params


def advance(*, plans: Sequence[tuple[Schedule, datetime | None]], now: datetime) -> set[uuid.UUID]:
    """Move each schedule's deadline to its next occurrence (None: FINISHED) if it is still
    ACTIVE and due; return the ids that moved. A schedule another runner advanced meanwhile is
    no longer due and is left out: its occurrence is that runner's."""
    if not plans:
        return set()
    q = connection.ops.quote_name
    # PostgreSQL cannot type a CASE whose branches are all NULL parameters: say it.
    cast = "CAST(%s AS timestamp with time zone)" if connection.vendor == "postgresql" else "%s"
    ids = [_prep("id", schedule.id) for schedule, _ in plans]
    deadline_sql, deadline_params = _case(
        "deadline_at",
        [(i, _prep("deadline_at", at)) for i, (_, at) in zip(ids, plans, strict=True)],
        value_sql=cast,
    )
    status_sql, status_params = _case(
        "status",
        [
            (i, ScheduleStatus.ACTIVE if at else ScheduleStatus.FINISHED)
            for i, (_, at) in zip(ids, plans, strict=True)
        ],
    )
    stamp = _prep("last_run_at", now)
    sql = (
        f"UPDATE {q(Schedule._meta.db_table)} SET {deadline_sql}, {status_sql}, "
        f"{q('last_run_at')} = %s, {q('run_count')} = {q('run_count')} + 1, "
        f"{q('modified_at')} = %s "
        f"WHERE {q('id')} IN ({', '.join(['%s'] * len(ids))}) "
        f"AND {q('status')} = %s AND {q('deadline_at')} <= %s RETURNING {q('id')}"
    )
    params = [*deadline_params, *status_params, stamp, stamp, *ids, ScheduleStatus.ACTIVE, stamp]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        moved = [row[0] for row in cursor.fetchall()]
    return {Schedule._meta.pk.to_python(value) for value in moved}


_UNIQUE_FIELDS = {"schedule_hash_uniq": "hash", "schedule_name_uniq": "name"}


def unique_conflict(exc: Exception) -> str | None:
    """The field ("hash" or "name") whose per-scheduler uniqueness `exc` violated; None for
    any other integrity error (the scheduler's foreign key, a check), which is no duplicate."""
    cause = exc.__cause__
    diag = getattr(cause, "diag", None)
    if diag is not None:  # psycopg
        if getattr(cause, "sqlstate", None) != "23505":
            return None
        return _UNIQUE_FIELDS.get(diag.constraint_name or "")
    message = str(exc)  # SQLite names the columns, not the constraint
    if not message.startswith("UNIQUE constraint failed:"):
        return None
    table = Schedule._meta.db_table
    columns = {part.strip() for part in message.split(":", 1)[1].split(",")}
    for field in ("hash", "name"):
        if columns == {f"{table}.scheduler_id", f"{table}.{field}"}:
            return field
    return None


def scheduler_held(scheduler_id: str) -> bool:
    """Whether the scheduler exists, locked until the caller's transaction ends so that it
    cannot be deleted before a new schedule naming it commits (FOR NO KEY UPDATE: a
    delete waits for it; SQLite's IMMEDIATE transaction already excludes every writer). The
    foreign key alone would say so only at the outermost commit (Django makes it
    DEFERRABLE), which may be a caller's: the admin's, a beat import's."""
    return Scheduler.objects.select_for_update(no_key=True).filter(id=scheduler_id).exists()


def foreign_key_violated(exc: Exception) -> bool:
    cause = exc.__cause__
    if getattr(cause, "diag", None) is not None:
        return getattr(cause, "sqlstate", None) == "23503"
    return str(exc).startswith("FOREIGN KEY constraint failed")
