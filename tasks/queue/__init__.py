"""The tasks app's SQL, in one package: every statement that writes a task (and the lock rows),
named and built from the models' `Meta.db_table`. The one writer of task status: callers go
through tasks.transitions, tasks.reports, tasks.flow and tasks.housekeeping, never the ORM.

Every status change is an `UPDATE … WHERE id … AND status = <expected> RETURNING *`: a
compare-and-swap, so two callers racing for one row cannot both win. Pop selects its rows with
`FOR UPDATE SKIP LOCKED` on PostgreSQL inside the same statement, so N poppers never get the same
task and never wait on each other. SQLite ignores row locks; there the IMMEDIATE transaction
(see scheduler_site.databases) makes the statement run with the write lock held.

Modules, by noun: `rows` (CAS, inserts, the ORM claim, row conversion), `pop`, `worker` (claim
and report in one statement each), `refill` (a dispatch round in one round trip), `flow`
(flow control's hand-outs), `expiry`, `locks`.
"""

from __future__ import annotations

from typing import Any

from tasks.queue.expiry import _expire_sql, expire_due
from tasks.queue.flow import (
    flow_claim_ids,
    flow_execute,
    flow_head_sql,
    flow_prep_now,
    flow_sql,
    flow_walk_sql,
    prep_ids,
)
from tasks.queue.handout import EMPTY as HANDOUT_EMPTY
from tasks.queue.handout import OTHER as HANDOUT_OTHER
from tasks.queue.handout import TOOK as HANDOUT_TOOK
from tasks.queue.handout import HandoutResult, handout, handout_sql
from tasks.queue.pop import (
    _pop_sql,
    lease_expired_ids,
    pop_in_one_statement,
    unclaimed_expired,
)
from tasks.queue.refill import (
    Dispatched,
    Round,
    dispatch_claim_sql,
    dispatch_round,
    round_in_one_query_possible,
)
from tasks.queue.rows import (
    ACTIVE_HASH,
    ACTIVE_SCHEDULE,
    ONE_STATEMENT_WRITES,
    Sql,
    StaleFlowKeys,
    _fetch_tasks,
    active_conflict,
    cas_update,
    claim_queued,
    data_filter,
    insert_one_queued,
    insert_queued,
    insert_queued_new,
    new_lease_token,
    record_events,
)
from tasks.queue.worker import _complete_sql, _start_sql, complete_leased, start_dispatched

# The statements that write a task's status, by name: tests/tasks/test_writer.py reads each
# one's `SET status` and `WHERE … status` and proves the move against ALLOWED_TRANSITIONS.
# (cas_update and claim_queued build theirs from their arguments and check them at run time.)
STATUS_STATEMENTS: dict[str, Any] = {
    "pop": _pop_sql,
    "start": _start_sql,
    "complete": _complete_sql,
    "expire": _expire_sql,
    "dispatch": dispatch_claim_sql,
    # One text per kind of pick; the claim (its UPDATE) is the same in each.
    "flow_handout": lambda: handout_sql(pick="order", rate=True, mint_token=True),
}

__all__ = [
    "ACTIVE_HASH",
    "ACTIVE_SCHEDULE",
    "HANDOUT_EMPTY",
    "HANDOUT_OTHER",
    "HANDOUT_TOOK",
    "ONE_STATEMENT_WRITES",
    "STATUS_STATEMENTS",
    "Dispatched",
    "HandoutResult",
    "Round",
    "Sql",
    "StaleFlowKeys",
    "_fetch_tasks",
    "_pop_sql",
    "active_conflict",
    "cas_update",
    "claim_queued",
    "complete_leased",
    "data_filter",
    "dispatch_round",
    "expire_due",
    "flow_claim_ids",
    "flow_execute",
    "flow_head_sql",
    "flow_prep_now",
    "flow_sql",
    "flow_walk_sql",
    "handout",
    "handout_sql",
    "insert_one_queued",
    "insert_queued",
    "insert_queued_new",
    "lease_expired_ids",
    "new_lease_token",
    "pop_in_one_statement",
    "prep_ids",
    "record_events",
    "round_in_one_query_possible",
    "start_dispatched",
    "unclaimed_expired",
]
