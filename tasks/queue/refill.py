"""A dispatch round of a plain celery queue (no flow control) in one round trip, PostgreSQL only:
lock the queue's row, count its DISPATCHED tasks, flip up to `threshold - that` due QUEUED tasks
to DISPATCHED and record their events.

Through the ORM this was BEGIN, the row lock, the count, the claim, the event insert and COMMIT:
six round trips and most of a refill's database-side Python (the profile of the worker bench,
issue 12). Here the two statements travel as one query string. The simple query protocol runs
such a string as one implicit transaction (the row lock is held to its end, and it commits by
itself in autocommit), and under READ COMMITTED each statement takes its own snapshot: the
claim's count is taken after the lock was granted, so it sees every dispatch that committed
before, and concurrent dispatchers cannot overfill the broker. (One statement could not: its
snapshot is taken before it waits for the lock.) The lock statement leaves the id of the queue
it locked in a transaction-local setting; the claim does nothing unless it finds it there, so a
lock skipped (`skip_if_busy`) or a queue paused claims nothing. The parameters are bound on the
client (Django's cursor), which is what lets one string carry two statements.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime

from django.db import connection, transaction

from tasks.queue.rows import _names, _prep

# The transaction-local setting that says which queue this transaction holds the row lock of.
_LOCKED = "scheduler.dispatch_locked"


@dataclass(frozen=True)
class Dispatched:
    """A task the round flipped to DISPATCHED: what its message and a hand-back need."""

    id: object
    attempts: int
    trace_context: str | None


@dataclass(frozen=True)
class Round:
    """What a round did: `locked` False when the queue was not an unpaused celery queue or
    (skip_if_busy) another transaction held its row; `flow` True when the queue is flow
    controlled, which this round leaves to tasks.flow (nothing was claimed)."""

    locked: bool
    flow: bool = False
    handler: str = ""
    celery_queue: str = ""
    tasks: tuple[Dispatched, ...] = ()


def _lock_sql(*, skip_locked: bool) -> str:
    # The LEFT JOIN always yields one row, so the setting is written (or cleared) every time:
    # in an enclosing transaction, a value left by an earlier round must not count as a lock.
    # The lock is taken in the CTE: the outer SELECT (and set_config) only sees rows it locked.
    # Flow control mirrors Scheduler.flow_controlled.
    n = _names()
    return f"""
        WITH locked AS (
            SELECT id, handler, celery_queue,
                (rate_limit <> '' OR concurrency_key <> '' OR fair_key <> '') AS flow
            FROM {n["scheduler"]}
            WHERE id = %(id)s AND kind = 'celery' AND NOT paused
            FOR NO KEY UPDATE{" SKIP LOCKED" if skip_locked else ""}
        )
        SELECT locked.id IS NOT NULL, COALESCE(locked.flow, false), locked.handler,
            locked.celery_queue,
            set_config('{_LOCKED}', COALESCE(CASE WHEN NOT locked.flow THEN locked.id END, ''),
                true)
        FROM (VALUES (1)) AS one LEFT JOIN locked ON true
    """


def dispatch_claim_sql() -> str:
    # LIMIT COALESCE(..., 0): without the lock `room` has no row, and LIMIT NULL means no limit.
    # The candidates are picked once (MATERIALIZED), as claim_queued picks them, for the
    # same reason: a semi-join could re-run the subquery and lock more than the room. The
    # status test again in the UPDATE is the compare-and-swap. Until a worker claims it, the
    # lease is the claim timeout (`lease_until`), as tasks.dispatch sets it.
    n = _names()
    return f"""
        WITH room AS (
            SELECT s.dispatch_threshold - (
                SELECT count(*) FROM {n["task"]} d
                WHERE d.scheduler_id = s.id AND d.status = 'DISPATCHED'
            ) AS free
            FROM {n["scheduler"]} s
            WHERE s.id = %(id)s AND current_setting('{_LOCKED}', true) = s.id
        ), picked AS MATERIALIZED (
            SELECT q.id FROM {n["task"]} q
            WHERE q.scheduler_id = %(id)s AND q.status = 'QUEUED' AND q.not_before <= %(now)s
                AND (q.expires_at IS NULL OR q.expires_at > %(now)s)
            ORDER BY q.priority, q.created_at, q.id
            LIMIT COALESCE((SELECT GREATEST(free, 0) FROM room), 0)
            FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE {n["task"]} t SET status = 'DISPATCHED', attempts = t.attempts + 1,
                lease_expires_at = %(lease_until)s, worker = %(actor)s, modified_at = %(now)s
            FROM picked
            WHERE t.id = picked.id AND t.status = 'QUEUED'
            RETURNING t.id, t.attempts, t.trace_context, t.priority, t.created_at
        ), events AS (
            INSERT INTO {n["event"]} (task_id, from_status, to_status, at, actor, note)
            SELECT id, 'QUEUED', 'DISPATCHED', %(now)s, %(actor)s, %(note)s FROM claimed
        )
        SELECT id, attempts, trace_context FROM claimed ORDER BY priority, created_at, id
    """


_SQL: dict[bool, str] = {}  # by skip_locked: the round's query string, built once


def round_in_one_query_possible() -> bool:
    """Whether this connection can carry the round's two statements in one string: only with
    Django's client-side binding (its default); `server_side_binding` prepares each query, and
    PostgreSQL refuses to prepare two statements at once."""
    return connection.vendor == "postgresql" and not connection.settings_dict.get(
        "OPTIONS", {}
    ).get("server_side_binding")


def dispatch_round(
    *,
    scheduler_id: str,
    skip_if_busy: bool,
    now: datetime,
    lease_until: datetime,
    actor: str,
    note: str,
) -> Round:
    """One dispatch round of a plain celery queue, committed when it returns (outside an atomic
    block; inside one, it is part of that transaction and the lock is held until its end)."""
    if skip_if_busy not in _SQL:
        _SQL[skip_if_busy] = f"{_lock_sql(skip_locked=skip_if_busy)};\n{dispatch_claim_sql()}"
    params = {
        "id": scheduler_id,
        "now": _prep("modified_at", now),
        "lease_until": _prep("lease_expires_at", lease_until),
        "actor": actor[:200],
        "note": note,
    }
    # Inside a caller's transaction, a savepoint: an error here must not abort the caller's
    # whole transaction (the dispatcher logs it and goes on). Outside one, none is needed.
    savepoint = transaction.atomic() if connection.in_atomic_block else nullcontext()
    with savepoint, connection.cursor() as cursor:
        cursor.execute(_SQL[skip_if_busy], params)
        locked, flow, handler, celery_queue, _setting = cursor.fetchone()
        cursor.nextset()
        rows = cursor.fetchall()
    if not locked or flow:
        return Round(locked=locked, flow=flow)
    return Round(
        locked=True,
        handler=handler,
        celery_queue=celery_queue,
        tasks=tuple(Dispatched(*row) for row in rows),
    )
