"""The worker's hot path: claim (DISPATCHED -> RUNNING) and report (-> COMPLETED) in one
statement each on PostgreSQL, and their IMMEDIATE-transaction twins on SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction

from tasks.models import (
    Scheduler,
    Task,
    TaskStatus,
)
from tasks.queue.rows import (
    ONE_STATEMENT_WRITES,
    _fetch_tasks,
    _hot_sql,
    _names,
    _returned,
    cas_update,
    new_lease_token,
    record_events,
)

# --- the worker's hot path: claim and report in one statement each -------------------------
#
# A Celery worker runs every task through a claim (DISPATCHED -> RUNNING) and a report
# (-> COMPLETED). Through the ORM these were a read, a transaction, the CAS and an event insert
# each: most of a no-op task's cost. On PostgreSQL each is one statement of data-modifying CTEs
# (the CAS and its event commit together, in autocommit); SQLite runs the same steps in one
# IMMEDIATE transaction. Both return None when the compare-and-swap matched nothing; the caller
# then reads the task to say why.


def _start_sql(*, async_commit: bool = False) -> str:
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
    # `async_commit`: the statement's own transaction commits without waiting for its WAL
    # flush (set_config local to it, read at commit; only when the claim matched a row, so
    # only a claim's commit). See start_dispatched for why a worker's claim may.
    relaxed = "WHERE set_config('synchronous_commit', 'off', true) = 'off'" if async_commit else ""
    return f"""
        WITH {_start_ctes()}
        SELECT {_returned("started")}, started.handler_name, started.dispatch_threshold,
            {_broker_room()} AS broker_room
        FROM started {relaxed}
    """


def _start_ctes(*, locked: str = "") -> str:
    # The claim's CTEs: `started` (the compare-and-swap), its event, and the broker's room.
    # `locked`: the name of a CTE that locked the row to claim (its `id`) beforehand.
    n = _names()
    only_locked = f" AND t.id = (SELECT id FROM {locked})" if locked else ""
    return f"""started AS (
            UPDATE {n["task"]} t SET status = 'RUNNING', modified_at = %(now)s,
                lease_expires_at = %(now)s + make_interval(secs => s.lease_seconds),
                worker = %(actor)s,
                lease_token = CASE WHEN %(mint)s THEN {new_lease_token().text}
                    ELSE t.lease_token END
            FROM {n["scheduler"]} s
            WHERE t.id = %(id)s AND t.status = 'DISPATCHED'
                AND t.attempts = COALESCE(%(attempt)s, t.attempts)
                AND t.lease_token = COALESCE(%(token)s::text, t.lease_token)
                AND s.id = t.scheduler_id{only_locked}
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
    """


def _broker_room() -> str:
    n = _names()
    return f"""(SELECT CASE WHEN room.free >= GREATEST(1, started.dispatch_threshold / 2) THEN
                CASE WHEN EXISTS (
                    SELECT 1 FROM {n["task"]} q
                    WHERE q.scheduler_id = started.scheduler_id AND q.status = 'QUEUED'
                ) THEN room.free END
            END FROM room)"""


def _start_async_sql() -> str:
    return _start_sql(async_commit=True)


def _complete_sql() -> str:
    # A runner may report COMPLETED straight from DISPATCHED, so the status it had is read
    # (and the row locked) in `previous`. The UPDATE re-checks the allowed statuses, not
    # `previous.status`: it scans the statement's snapshot, and when `previous` waited for a
    # concurrent claim (DISPATCHED -> RUNNING) the snapshot still says DISPATCHED; the
    # re-check then runs on the newest version, the one `previous` locked and read.
    return f"""
        WITH {_complete_ctes()}
        SELECT * FROM completed
    """


def _complete_ctes(p: str = "") -> str:
    # The report's CTEs: `previous`, `completed` (the compare-and-swap) and its event; the
    # parameters named with prefix `p` (its fence, its note), so that one statement can carry
    # a report and a claim (_complete_start_sql).
    n = _names()
    return f"""
        previous AS MATERIALIZED (
            SELECT id, status FROM {n["task"]}
            WHERE id = %({p}id)s AND status IN ('DISPATCHED', 'RUNNING')
                AND attempts = COALESCE(%({p}attempt)s, attempts)
                AND lease_token = COALESCE(%({p}token)s::text, lease_token)
            FOR UPDATE
        ), completed AS (
            UPDATE {n["task"]} t SET status = 'COMPLETED', modified_at = %(now)s,
                result = %(result)s, error = '', lease_expires_at = NULL, lease_token = ''
            FROM previous
            WHERE t.id = previous.id AND t.status IN ('DISPATCHED', 'RUNNING')
                AND t.attempts = COALESCE(%({p}attempt)s, t.attempts)
                AND t.lease_token = COALESCE(%({p}token)s::text, t.lease_token)
            RETURNING {_returned("t")}, previous.status AS from_status
        ), completed_events AS (
            INSERT INTO {n["event"]} (task_id, from_status, to_status, at, actor, note)
            SELECT id, from_status, 'COMPLETED', %(now)s, %(actor)s, %({p}note)s FROM completed
        )
    """


def _complete_start_sql() -> str:
    # A report and the next claim of one worker's batch in one statement (one round trip, one
    # commit): both compare-and-swaps with their events, on different rows, each matching or
    # not on its own. Row kind 'C' is the completed task (with from_status), 'S' the started
    # one (with what a claim returns). Synchronous commit: it carries a report.
    # The statement must never wait for one row while it holds the other: a key change's
    # restamp locks the queue's active tasks in its own order, and each would wait for the
    # other until the deadlock detector rolled one back (the report with it). So the
    # reported row is locked first (`previous`, which may wait, holding nothing: the
    # one-time filter below makes `next_task` run after it), and the next task only if it
    # is free (SKIP LOCKED): a held one is not claimed here, and the caller claims it on its
    # own, waiting as any claim does.
    n = _names()
    return f"""
        WITH {_complete_ctes("c_")}, next_task AS MATERIALIZED (
            SELECT id FROM {n["task"]}
            WHERE id = %(id)s AND status = 'DISPATCHED' AND (SELECT COUNT(*) FROM previous) >= 0
            FOR UPDATE SKIP LOCKED
        ), {_start_ctes(locked="next_task")}
        SELECT {_returned("completed")}, completed.from_status, NULL::varchar AS handler_name,
            NULL::integer AS dispatch_threshold, NULL::bigint AS broker_room, 'C' AS kind
        FROM completed
        UNION ALL
        SELECT {_returned("started")}, NULL::varchar, started.handler_name,
            started.dispatch_threshold, {_broker_room()}, 'S'
        FROM started
    """


def _fenced_params(
    task_id: uuid.UUID,
    attempt: int | None,
    lease_token: str | None,
    *,
    now: datetime,
    actor: str,
    note: str,
) -> dict[str, Any]:
    """The parameters the start and complete statements share: the task, its fence (attempt
    and lease token, each checked when given), the time and the event's actor and note."""
    db = connections[DEFAULT_DB_ALIAS]
    return {
        "id": _hot_prep("id", task_id, db),
        "attempt": attempt,
        "token": lease_token,
        "now": _hot_prep("modified_at", now, db),
        "actor": actor[:200],
        "note": note,
    }


_HOT_FIELDS: dict[str, Any] = {}


def _hot_prep(field_name: str, value: Any, db: Any) -> Any:
    """rows._prep for the claim's and report's parameters: the same Django preparation, with the
    field looked up once and the caller's connection object rather than the `connection` proxy,
    each use of which goes through asgiref's Local (profiled in a pool process: a third of the
    preparation's time; bench/perf_worker_claim.py measures the whole path)."""
    field = _HOT_FIELDS.get(field_name)
    if field is None:
        field = _HOT_FIELDS[field_name] = Task._meta.get_field(field_name)
    return field.get_db_prep_save(value, db)


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
    something QUEUED), the room left after this claim; else None.

    With WORKER_CLAIM_ASYNC_COMMIT (opt-in: it can lose an event), a worker's claim
    (`mint_token`, outside a caller's transaction) commits asynchronously on PostgreSQL: no wait
    for the WAL flush, which under concurrent workers was where their database backends waited
    most (pg_stat_activity: WALSync and WALWrite, issue 12). The claim is durable once any later
    commit flushes the WAL (the report's, a lock's, a heartbeat's: WAL is flushed in order) or
    the WAL writer does (within 3 x wal_writer_delay). A database crash before that loses the
    claim and its event together; the task is DISPATCHED on the same attempt again, the worker's
    report and heartbeats carry the lost claim's token and are refused, and the claim timeout
    sends the task again: it runs again, as after a worker's death. Nothing reported is lost:
    the report, and every other status write, commits synchronously."""
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
    params = _fenced_params(task_id, attempt, lease_token, now=now, actor=actor, note=note)
    params["mint"] = mint_token
    # Only where the statement is its own transaction: `set_config(…, true)` lasts until the
    # transaction ends, so in a caller's transaction (an atomic block, or autocommit turned
    # off) it would make whatever that transaction writes next commit without its flush.
    # (Asked only when the claim may relax: each use of the `connection` proxy is a lookup.)
    relaxed = mint_token and settings.WORKER_CLAIM_ASYNC_COMMIT and _own_transaction()
    rows = _fetch_tasks(
        _hot_sql("start_async", _start_async_sql) if relaxed else _hot_sql("start", _start_sql),
        params,
        extras=("handler_name", "dispatch_threshold", "broker_room"),
        prepared=True,
    )
    return rows[0] if rows else None


def _own_transaction() -> bool:
    return connection.get_autocommit() and not connection.in_atomic_block


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
    params = _fenced_params(task_id, attempt, lease_token, now=now, actor=actor, note=note)
    params["result"] = _hot_prep("result", result, connections[DEFAULT_DB_ALIAS])
    rows = _fetch_tasks(
        _hot_sql("complete", _complete_sql), params, extras=("from_status",), prepared=True
    )
    return rows[0] if rows else None


def complete_and_start(
    *,
    task_id: uuid.UUID,
    attempt: int,
    lease_token: str,
    result: Any,
    next_id: uuid.UUID,
    next_attempt: int,
    now: datetime,
    actor: str,
) -> tuple[Task | None, Task | None]:
    """PostgreSQL: RUNNING -> COMPLETED of `task_id` (fenced by its attempt and lease token)
    and DISPATCHED -> RUNNING of `next_id` on `next_attempt` (a fresh token), each with its
    event, in one statement: (the completed task or None, the started one or None), each
    refused on its own as complete_leased and start_dispatched would refuse it."""
    db = connections[DEFAULT_DB_ALIAS]
    params = _fenced_params(next_id, next_attempt, None, now=now, actor=actor, note="started")
    params |= {
        "mint": True,
        "c_id": _hot_prep("id", task_id, db),
        "c_attempt": attempt,
        "c_token": lease_token,
        "c_note": "completed",
        "result": _hot_prep("result", result, db),
    }
    extras = ("from_status", "handler_name", "dispatch_threshold", "broker_room", "kind")
    rows = _fetch_tasks(
        _hot_sql("complete_start", _complete_start_sql), params, extras=extras, prepared=True
    )
    by_kind = {row.kind: row for row in rows}
    return by_kind.get("C"), by_kind.get("S")


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
