"""The pop: one statement on PostgreSQL (pick with FOR UPDATE SKIP LOCKED, CAS, events), and
the reads of expired leases and unclaimed dispatches; the event rows of a batch of moves."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db import connection

from tasks.models import (
    Task,
    TaskEvent,
    TaskStatus,
)
from tasks.queue.rows import (
    _fetch_tasks,
    _hot_sql,
    new_lease_token,
)


def _pop_sql(*, by_tid: bool = True) -> str:
    """The pop statement; `by_tid`: the UPDATE reaches the picked rows by their ctids (the
    batch pop's), else by primary key (a pop of one's: measured level or a little cheaper)."""
    q = connection.ops.quote_name
    task, event = q(Task._meta.db_table), q(TaskEvent._meta.db_table)
    scheduler = q(Task._meta.get_field("scheduler").related_model._meta.db_table)
    returned = ", ".join(f"t.{q(f.column)}" for f in Task._meta.concrete_fields)
    # picked filters on the constant scheduler id (not a join with `queue`) so the planner walks
    # task_queue_idx in order and stops at LIMIT; the uncorrelated EXISTS is evaluated once.
    # picked is MATERIALIZED so its LIMIT and SKIP LOCKED apply once (as `id IN (subquery)`
    # the planner may re-run it per row and claim far more than `limit`). By TID, it gives
    # the rows' ctids and the UPDATE joins on them, a TID scan per row: the row locks taken
    # in picked keep each locked version where it is until this transaction ends. A
    # primary-key lookup per task cost a descent of three pages (a batch pop's database CPU
    # fell 8-17 %); `ctid = ANY(ARRAY(…))` planned a sequential scan on small tables (it
    # assumes 10 TIDs), the join a TID scan at every size. A row that another transaction
    # changed after this statement's snapshot (and left QUEUED) is then not updated: it
    # stays QUEUED for the next pop, as a row locked by another pop does. The UPDATE
    # re-checks QUEUED: the compare-and-swap. The event rows come from what the
    # UPDATE returned, in the same statement, so a pop and its events commit or fail together.
    # A flow-controlled queue (rate, concurrency or fair key) is not this statement's: its
    # hand-outs take tasks.flow's path, which the empty answer leads to.
    reach = (
        "queue, picked WHERE t.ctid = picked.tid"
        if by_tid
        else "queue WHERE t.id IN (SELECT id FROM picked)"
    )
    return f"""
        WITH queue AS (
            SELECT s.id, s.lease_seconds FROM {scheduler} s
            WHERE s.id = %(scheduler)s AND NOT s.paused AND s.kind = 'pull'
                AND s.rate_limit = '' AND s.concurrency_key = '' AND s.fair_key = ''
        ), picked AS MATERIALIZED (
            SELECT {"t.ctid AS tid" if by_tid else "t.id"} FROM {task} t
            WHERE t.scheduler_id = %(scheduler)s AND t.status = 'QUEUED'
                AND t.not_before <= %(now)s AND EXISTS (SELECT 1 FROM queue)
                AND (t.expires_at IS NULL OR t.expires_at > %(now)s)
            ORDER BY t.priority, t.created_at, t.id
            LIMIT %(limit)s FOR UPDATE OF t SKIP LOCKED
        ), popped AS (
            UPDATE {task} t SET status = 'DISPATCHED', attempts = t.attempts + 1,
                lease_expires_at = %(now)s + make_interval(secs => queue.lease_seconds),
                worker = %(worker)s, modified_at = %(now)s, lease_token = {new_lease_token().text}
            FROM {reach} AND t.status = 'QUEUED'
            RETURNING {returned}
        ), events AS (
            INSERT INTO {event} (task_id, from_status, to_status, at, actor, note)
            SELECT id, 'QUEUED', 'DISPATCHED', %(now)s, %(worker)s, 'popped' FROM popped
        )
        SELECT * FROM popped ORDER BY priority, created_at, id
    """


def pop_in_one_statement(
    *, scheduler_id: str, limit: int, now: datetime, worker: str
) -> list[Task]:
    """PostgreSQL only: claim up to `limit` due tasks of an unpaused pull scheduler and write
    their events, in one statement (no transaction block needed). [] says nothing about why."""
    params = {"scheduler": scheduler_id, "now": now, "limit": limit, "worker": worker}
    if limit == 1:
        return _fetch_tasks(_hot_sql("pop", lambda: _pop_sql(by_tid=False)), params, prepared=True)
    return _fetch_tasks(_hot_sql("pop_batch", _pop_sql), params, prepared=True)


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
