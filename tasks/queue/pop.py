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


def _pop_sql(*, ordered: bool = True) -> str:
    """The pop statement; `ordered`: the rows come back in queue order (a batch's; sorting
    100 Tasks in Python cost more client CPU than the Sort node costs the database)."""
    q = connection.ops.quote_name
    task, event = q(Task._meta.db_table), q(TaskEvent._meta.db_table)
    scheduler = q(Task._meta.get_field("scheduler").related_model._meta.db_table)
    returned = ", ".join(f"t.{q(f.column)}" for f in Task._meta.concrete_fields)
    # picked filters on the constant scheduler id (not a join with `queue`) so the planner walks
    # task_queue_idx in order and stops at LIMIT; the uncorrelated EXISTS is evaluated once.
    # picked is MATERIALIZED so its LIMIT and SKIP LOCKED apply once (as `id IN (subquery)`
    # the planner may re-run it per row and claim far more than `limit`). It gives the rows'
    # ctids, and the UPDATE fetches those (a TID scan): the row locks taken in picked keep
    # each locked version where it is until this transaction ends; a primary-key lookup per
    # task was a descent of three pages (a batch pop's database CPU fell 8-17 %). As
    # `ctid = ANY(ARRAY(…))` the plan is a TID scan whatever LIMIT is; a join with picked was
    # one only while the planner knew LIMIT: the generic plan (every prepared pop's) assumes
    # a tenth of the queue is picked, and with a backlog it hash-joined them over a
    # sequential scan of the table (99 ms a pop of 100 at 300,000 queued). On a table of a few
    # pages the plan may be a sequential scan, which costs as little there; ANALYZE replans.
    # A row that another transaction changed after this statement's snapshot (and left
    # QUEUED) is then not updated: it stays QUEUED for the next pop, as a row locked by
    # another pop does. The UPDATE re-checks QUEUED: the compare-and-swap. The event rows
    # come from what the UPDATE returned, in the same statement, so a pop and its events
    # commit or fail together. The lease length is a scalar subquery (an InitPlan, run
    # once) rather than a join with `queue`, and a pop of one has no Sort: each node less is
    # executor set-up saved on every call.
    # A flow-controlled queue (rate, concurrency or fair key) is not this statement's: its
    # hand-outs take tasks.flow's path, which the empty answer leads to.
    return f"""
        WITH queue AS (
            SELECT s.id, s.lease_seconds FROM {scheduler} s
            WHERE s.id = %(scheduler)s AND NOT s.paused AND s.kind = 'pull'
                AND s.rate_limit = '' AND s.concurrency_key = '' AND s.fair_key = ''
        ), picked AS MATERIALIZED (
            SELECT t.ctid AS tid FROM {task} t
            WHERE t.scheduler_id = %(scheduler)s AND t.status = 'QUEUED'
                AND t.not_before <= %(now)s AND EXISTS (SELECT 1 FROM queue)
                AND (t.expires_at IS NULL OR t.expires_at > %(now)s)
            ORDER BY t.priority, t.created_at, t.id
            LIMIT %(limit)s FOR UPDATE OF t SKIP LOCKED
        ), popped AS (
            UPDATE {task} t SET status = 'DISPATCHED', attempts = t.attempts + 1,
                lease_expires_at = %(now)s
                    + make_interval(secs => (SELECT lease_seconds FROM queue)),
                worker = %(worker)s, modified_at = %(now)s, lease_token = {new_lease_token().text}
            WHERE t.ctid = ANY(ARRAY(SELECT tid FROM picked)) AND t.status = 'QUEUED'
            RETURNING {returned}
        ), events AS (
            INSERT INTO {event} (task_id, from_status, to_status, at, actor, note)
            SELECT id, 'QUEUED', 'DISPATCHED', %(now)s, %(worker)s, 'popped' FROM popped
        )
        SELECT * FROM popped{" ORDER BY priority, created_at, id" if ordered else ""}
    """


def pop_in_one_statement(
    *, scheduler_id: str, limit: int, now: datetime, worker: str
) -> list[Task]:
    """PostgreSQL only: claim up to `limit` due tasks of an unpaused pull scheduler and write
    their events, in one statement (no transaction block needed). [] says nothing about why."""
    params = {"scheduler": scheduler_id, "now": now, "limit": limit, "worker": worker}
    if limit == 1:
        return _fetch_tasks(_hot_sql("pop", lambda: _pop_sql(ordered=False)), params, prepared=True)
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
