"""Task expiry (DESIGN §9.4): the reaper's batch statement that ends due QUEUED tasks EXPIRED."""

from __future__ import annotations

from datetime import datetime

from django.db import connection, transaction

from tasks.models import (
    Task,
    TaskStatus,
)
from tasks.queue.rows import (
    ONE_STATEMENT_WRITES,
    _hot_sql,
    _names,
    _prep,
    cas_update,
    record_events,
)

# --- expiry (DESIGN 9.4) ------------------------------------------------------------------------
#
# A QUEUED task whose `expires_at` has passed is never handed out (pop and claim_queued skip it
# with one predicate) and the reaper ends it EXPIRED here, in batches, oldest expiry first,
# through task_expiry_idx. On PostgreSQL one statement per batch (SKIP LOCKED: a concurrent
# pop or a second reaper never waits on it, and a row a pop holds is left to that pop, which
# will not take it anyway); on SQLite the same steps in one IMMEDIATE transaction.


def _expire_sql() -> str:
    n = _names()
    return f"""
        WITH due AS MATERIALIZED (
            SELECT t.id FROM {n["task"]} t
            WHERE t.status = 'QUEUED' AND t.expires_at IS NOT NULL AND t.expires_at <= %(now)s
            ORDER BY t.expires_at LIMIT %(limit)s FOR UPDATE OF t SKIP LOCKED
        ), expired AS (
            UPDATE {n["task"]} t SET status = 'EXPIRED', modified_at = %(now)s,
                lease_token = '', worker = ''
            WHERE t.id IN (SELECT id FROM due) AND t.status = 'QUEUED'
            RETURNING t.id
        ), events AS (
            INSERT INTO {n["event"]} (task_id, from_status, to_status, at, actor, note)
            SELECT id, 'QUEUED', 'EXPIRED', %(now)s, %(actor)s, %(note)s FROM expired
        )
        SELECT count(*) FROM expired
    """


def expire_due(*, now: datetime, limit: int, actor: str) -> int:
    """End up to `limit` QUEUED tasks whose `expires_at` is at or before `now` as EXPIRED,
    with their events; how many."""
    note = "expired: not handed out before expires_at"
    if ONE_STATEMENT_WRITES:
        params = {"now": _prep("modified_at", now), "limit": limit, "actor": actor[:200]}
        with connection.cursor() as cursor:
            cursor.execute(_hot_sql("expire", _expire_sql), {**params, "note": note})
            return int(cursor.fetchone()[0])
    with transaction.atomic():
        ids = list(
            Task.objects.filter(status=TaskStatus.QUEUED, expires_at__lte=now)
            .order_by("expires_at")
            .values_list("id", flat=True)[:limit]
        )
        values = {"status": TaskStatus.EXPIRED, "modified_at": now, "lease_token": "", "worker": ""}
        rows = cas_update(task_ids=ids, expected=TaskStatus.QUEUED, values=values)
        record_events(rows, from_status=TaskStatus.QUEUED, actor=actor, note=note, at=now)
    return len(rows)
