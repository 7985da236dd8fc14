"""Flow control's statements (DESIGN §9.4), run by tasks.flow under the queue's FlowState lock."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from django.db import connection

from tasks.models import (
    FlowHandout,
    FlowState,
    Task,
    TaskStatus,
)
from tasks.queue.rows import (
    _assignments,
    _check_transition,
    _columns,
    _fetch_tasks,
    _hot_sql,
    _names,
    _prep,
    _prep_ids,
)

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
        # The batch's row carries the queue's running total (see FlowHandout.total).
        "flow_window_add": f"INSERT INTO {n['handout']} (scheduler_id, at_us, count, total) "
        f"SELECT %s, %s, %s, handed_out + %s FROM {n['state']} WHERE scheduler_id = %s",
        # Every hand-out changes the state row: the one-statement hand-out (queue/handout.py)
        # tells by it that its snapshot predates a hand-out it waited for.
        "flow_state_bump": f"UPDATE {n['state']} SET handed_out = handed_out + %s "
        "WHERE scheduler_id = %s",
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
    scheduler, cursor, scheduler, [blocked values, scheduler, now, now, taken ids], wanted,
    scheduler, now, now, taken ids, blocked values, wanted."""
    n = _flow_names()
    ids = ", ".join(["%s"] * skip_ids)
    values = ", ".join(["%s"] * skip_values)
    blocked = f" AND walk.v NOT IN ({values})" if skip_values else ""
    first = ">=" if from_start else ">"
    skip = f" AND e.id NOT IN ({ids})" if skip_ids else ""
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
                        AND e.not_before <= %s
                        AND (e.expires_at IS NULL OR e.expires_at > %s){skip}
                ) THEN 1 ELSE 0 END
            FROM walk WHERE walk.v IS NOT NULL AND walk.found < %s
        ), heads AS (
            SELECT walk.v, (SELECT h.id FROM {n["task"]} h
                WHERE h.scheduler_id = %s AND h.status = 'QUEUED'
                    AND h.concurrency_value = walk.v AND h.not_before <= %s
                    AND (h.expires_at IS NULL OR h.expires_at > %s)
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
        f" AND fair_value = %s AND not_before <= %s"
        f" AND (expires_at IS NULL OR expires_at > %s){where}"
        " ORDER BY priority, created_at, id LIMIT 1"
    )


def flow_prep_now(now: datetime) -> Any:
    return _prep("not_before", now)


def prep_ids(ids: Iterable[Any]) -> list[Any]:
    return _prep_ids(uuid.UUID(str(task_id)) for task_id in ids)


def flow_claim_ids(
    *,
    scheduler_id: str,
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
    # SKIP LOCKED although the flow lock keeps other hand-outs of this queue out: a claim that
    # waited for a row another transaction holds would wait holding the flow lock, and a
    # writer that locks queued tasks first (a key change's restamp, a cancel and a pop in one
    # transaction) would deadlock with it, or see a task it restamps handed out under the
    # key it had before.
    if in_order is None:
        ids = ", ".join(["%s"] * len(task_ids))
        head = (
            f"WITH picked AS MATERIALIZED (SELECT id FROM {n['task']} WHERE id IN ({ids}) "
            "FOR UPDATE SKIP LOCKED), "
        )
        pick_params = prep_ids(task_ids)
    else:
        head = (
            f"WITH picked AS MATERIALIZED (SELECT id FROM {n['task']} WHERE scheduler_id = %s "
            "AND status = 'QUEUED' AND not_before <= %s "
            "AND (expires_at IS NULL OR expires_at > %s) ORDER BY priority, created_at, id "
            "LIMIT %s FOR UPDATE SKIP LOCKED), "
        )
        due = _prep("not_before", now)
        pick_params = [in_order[0], due, due, in_order[1]]
    sql = (
        f"{head}claimed AS (UPDATE {n['task']} SET {set_sql} "
        "WHERE id IN (SELECT id FROM picked) AND status = 'QUEUED' "
        f"RETURNING {_columns()}), "
        f"events AS (INSERT INTO {n['event']} (task_id, from_status, to_status, at, actor, note) "
        "SELECT id, 'QUEUED', status, %s, %s, %s FROM claimed)"
    )
    params: list[Any] = [*pick_params, *set_params, _prep("modified_at", now)]
    params += [actor[:200], note]
    if window_log is not None:
        _, now_us, start_us = window_log
        sql += (
            f", logged AS (INSERT INTO {n['handout']} (scheduler_id, at_us, count, total) "
            f"SELECT %s, %s, COUNT(*), (SELECT handed_out FROM {n['state']} "
            "WHERE scheduler_id = %s) + COUNT(*) FROM claimed HAVING COUNT(*) > 0), "
            f"pruned AS (DELETE FROM {n['handout']} WHERE scheduler_id = %s AND at_us <= %s)"
        )
        params += [scheduler_id, now_us, scheduler_id, scheduler_id, start_us]
    # The state row changes with every hand-out (its total, and fair share's cursor): one
    # UPDATE, as a second one of the same row in this statement would be ignored.
    keep = cursor_save is None
    sql += (
        f", saved AS (UPDATE {n['state']} SET handed_out = handed_out + "
        "(SELECT COUNT(*) FROM claimed), "
        "fair_cursor = CASE WHEN %s THEN fair_cursor ELSE %s END "
        "WHERE scheduler_id = %s AND EXISTS (SELECT 1 FROM claimed))"
    )
    params += [keep, None if cursor_save is None else cursor_save[1], scheduler_id]
    rows = _fetch_tasks(sql + " SELECT * FROM claimed", params)
    rows.sort(key=lambda task: (task.priority, task.created_at, str(task.id)))
    return rows
