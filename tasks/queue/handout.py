"""Flow control's one-statement hand-out (PostgreSQL, DESIGN §9.4): a queue with a rate limit,
a concurrency key or a fair key hands out in one statement, like the plain pop, instead of
tasks.flow's transaction of four to six.

The statement locks the queue's FlowState row (`FOR UPDATE`), checks the rate window (two
index reads: running totals, see FlowHandout.total), picks (queue order, the active count per
concurrency value, or the next fair values after the cursor), claims by compare-and-swap,
writes the events, the window's row and the state row's new total and cursor.

One statement has one snapshot, taken before it waits for the lock: if the previous holder
committed while it waited, the counts it read are old. Every hand-out (this statement or
tasks.flow's) updates the state row, so that case shows: the locked row (the newest version)
is not the one the snapshot sees. The statement then takes nothing and answers "stale", and
the caller hands out under the lock taken first, in statements of their own (tasks.flow).

The picks lock the tasks they choose with `FOR UPDATE SKIP LOCKED`, as the plain pop does,
although every hand-out of the queue holds its FlowState lock: a pick that waited for a row
another transaction holds would wait while holding FlowState, and a writer that locks
queued tasks first (a key change's restamp, a cancel and a pop in one transaction) would
deadlock with it, or hand a task out under the key it had before the change. Skipping a
locked row costs a WAL record and a page write per pop (about a tenth of a crowded pop).
Executor set-up is paid per plan node on every run, taken or not: the statements keep their
nodes few (one row for the answer, a join with `room` rather than a subquery per field).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.db import connection

from tasks.models import FlowHandout, FlowState, Task
from tasks.queue.rows import _fetch_tasks, _hot_sql, _names, _returned, new_lease_token

# How far the concurrency pick reads the queue in order (as tasks.flow's SCAN_FACTOR and
# SCAN_EXTRA); a stretch that is all blocked values is tasks.flow's, which walks the values.
SCAN_FACTOR, SCAN_EXTRA = 2, 16
# The fair walk visits at most this many values more than it takes: values with nothing due
# lose their turn at two seeks each; a longer run of them is tasks.flow's loop.
FAIR_EXTRA_STEPS = 16

# Why a statement took nothing: "empty" (nothing due, or nothing allowed by the concurrency
# limits) is the answer; the others send the caller to tasks.flow's path. "held": the pick
# chose a task another transaction holds (SKIP LOCKED passed it: a cancel, the expiry batch,
# a key change's restamp), and a later task may be due: tasks.flow's path picks past it.
EMPTY, OTHER, HELD = "empty", "other", "held"  # also: "stale", "blocked", "more", "nostate"


@dataclass(frozen=True)
class HandoutResult:
    tasks: list[Task]
    status: str  # "ok" (or "walked", TOOK) when tasks were taken, else a reason above


# The attempts of a queue that ended (reports, the reaper; a retry is QUEUED again) after the
# caller read its clock: the hand-out's time is then theirs, so that every hand-out's events
# show the limit held (a count that saw an attempt end reads a clock at or after its end).
_LAST_END = """(SELECT MAX(e.modified_at) FROM {task} e WHERE e.scheduler_id = %(sid)s
    AND e.status IN ('COMPLETED', 'FAILED', 'DEAD', 'CANCELLED', 'QUEUED')
    AND e.modified_at > %(now)s AND (e.status <> 'QUEUED' OR e.attempts > 0))"""


def _head_sql(*, rate: bool, concurrency: bool) -> str:
    """The scheduler check, the lock, the freshness test, the clock and the rate's room."""
    n = {
        **_names(),
        "state": connection.ops.quote_name(FlowState._meta.db_table),
        "handout": connection.ops.quote_name(FlowHandout._meta.db_table),
    }
    # The window's count: the total now minus the total before the window's oldest batch.
    used = (
        f"gate.handed_out - COALESCE((SELECT h.total - h.count FROM {n['handout']} h "
        "WHERE h.scheduler_id = %(sid)s AND h.at_us > gate.now_us - %(window_us)s "
        "ORDER BY h.at_us, h.total LIMIT 1), gate.handed_out)"
    )
    room = f"LEAST(%(limit)s, %(rate_count)s - ({used}))" if rate else "%(limit)s"
    # The clock: the caller's, or a later hand-out or end it did not see (so that the window
    # log, in lock order, is in time order too, and the events show every limit held).
    clocks = ["%(now)s::timestamptz"]
    if rate:
        clocks.append(
            f"(SELECT timestamptz 'epoch' + h.at_us * interval '1 microsecond' "
            f"FROM {n['handout']} h WHERE h.scheduler_id = %(sid)s ORDER BY h.at_us DESC LIMIT 1)"
        )
    if concurrency:
        clocks.append(_LAST_END.replace("{task}", n["task"]))
    # `OFFSET 0` keeps the clock's subquery one: pulled up, its reads ran once per use of it.
    return f"""
        WITH s AS MATERIALIZED (
            SELECT 1 FROM {n["scheduler"]} sc
            WHERE sc.id = %(sid)s AND NOT sc.paused AND sc.kind = %(kind)s
                AND sc.rate_limit = %(rate)s AND sc.concurrency_key = %(ckey)s
                AND sc.concurrency_limit = %(climit)s AND sc.fair_key = %(fkey)s
                AND sc.lease_seconds = %(scheduler_lease)s
        ), lock AS MATERIALIZED (
            SELECT st.xmin AS seen, st.fair_cursor, st.handed_out FROM {n["state"]} st
            WHERE st.scheduler_id = %(sid)s AND EXISTS (SELECT 1 FROM s) FOR UPDATE
        ), room AS MATERIALIZED (
            SELECT gate.*, CASE WHEN gate.fresh THEN GREATEST(0, {room}) ELSE 0 END AS allowed
            FROM (SELECT lock.fair_cursor, lock.handed_out, c.now,
                floor(extract(epoch FROM c.now) * 1000000)::bigint AS now_us,
                lock.seen = (SELECT o.xmin FROM {n["state"]} o
                    WHERE o.scheduler_id = %(sid)s) AS fresh
            FROM lock, (SELECT GREATEST({", ".join(clocks)}) AS now OFFSET 0) c OFFSET 0) gate
        )"""


def _order_pick() -> str:
    return """, picked AS MATERIALIZED (
            SELECT t.id FROM {task} t
            WHERE t.scheduler_id = %(sid)s AND t.status = 'QUEUED'
                AND t.not_before <= (SELECT now FROM room)
                AND (t.expires_at IS NULL OR t.expires_at > (SELECT now FROM room))
            ORDER BY t.priority, t.created_at, t.id
            LIMIT (SELECT allowed FROM room) FOR UPDATE OF t SKIP LOCKED
        ), verdict AS (SELECT 'empty' AS why), new_cursor AS (SELECT NULL::text AS v)"""


def _walk(column: str, *, has_room: str, wanted: str, start: str) -> str:
    """A recursive walk over the queue's values of `column` from the cursor (after the last
    value, wrapping once to the first), one index seek per value and one for its head: each
    row is a value and its due head when `has_room(value)` (SQL over `{v}`), stopping once
    `wanted` heads are found or FAIR_EXTRA_STEPS values more than that were passed."""
    values = (
        f"SELECT MIN(q.{column}) FROM {{task}} q WHERE q.scheduler_id = %(sid)s "
        f"AND q.status = 'QUEUED' AND q.{column} IS NOT NULL"
    )
    head = (
        f"CASE WHEN {has_room} THEN (SELECT h.id FROM {{task}} h WHERE h.scheduler_id = %(sid)s"
        f" AND h.status = 'QUEUED' AND h.{column} = {{v}}"
        " AND h.not_before <= (SELECT now FROM room)"
        " AND (h.expires_at IS NULL OR h.expires_at > (SELECT now FROM room))"
        " ORDER BY h.priority, h.created_at, h.id LIMIT 1) END"
    )
    # The cursor's bound stays a plain `>` (an index condition: `cursor IS NULL OR …` would
    # filter every entry up to it, O(tasks before the cursor)).
    cursor = "(SELECT fair_cursor FROM room)"
    found = "w.found + (w.head IS NOT NULL)::int"
    return f""", walk(v, head, steps, wrapped, found) AS (
            SELECT f.v, {head.replace("{v}", "f.v")}, 1, f.wrapped, 0
            FROM (SELECT COALESCE(n.v, a.v) AS v, n.v IS NULL AS wrapped
                FROM ({values}) a(v), LATERAL (SELECT CASE WHEN {cursor} IS NULL THEN a.v
                    ELSE ({values} AND q.{column} > {cursor}) END) n(v)) f
            WHERE {start} AND f.v IS NOT NULL
            UNION ALL
            SELECT x.v, {head.replace("{v}", "x.v")}, w.steps + 1, x.wrapped, {found}
            FROM walk w, LATERAL (
                SELECT COALESCE(n.v, CASE WHEN w.wrapped THEN NULL ELSE a.v END) AS v,
                    w.wrapped OR n.v IS NULL AS wrapped
                FROM ({values} AND q.{column} > w.v) n(v), ({values}) a(v)) x
            WHERE x.v IS NOT NULL AND NOT {_revisit("x")}
                AND {found} < {wanted} AND w.steps < {wanted} + {FAIR_EXTRA_STEPS}
        ), heads AS MATERIALIZED (
            SELECT w.v, w.head, w.steps FROM walk w WHERE w.head IS NOT NULL AND NOT {_revisit("w")}
        ), walk_cut AS MATERIALIZED (
            SELECT COALESCE(MAX(steps), 0) >= {wanted} + {FAIR_EXTRA_STEPS} AS yes FROM walk
        )"""


def _revisit(row: str) -> str:
    """Past the last value and back beyond the cursor, where the turn began."""
    cursor = "(SELECT fair_cursor FROM room)"
    return f"({row}.wrapped AND ({cursor} IS NULL OR {row}.v > {cursor}))"


# The active tasks of one concurrency value: a count over task_active_value_idx.
_ACTIVE = """(SELECT COUNT(*) FROM {task} a WHERE a.scheduler_id = %(sid)s
    AND a.status IN ('DISPATCHED', 'RUNNING') AND a.concurrency_value = {v})"""


def _concurrency_pick() -> str:
    """Queue order for a bounded stretch, each task counted against its value's active tasks
    and the ones before it in the stretch. When blocked values fill the whole stretch, the
    heads of the values with room, one per value, walking from the queue's cursor (so a
    value with 100,000 queued tasks at its limit is passed at one seek, never read)."""
    scan = f"(SELECT allowed * {SCAN_FACTOR} + {SCAN_EXTRA} FROM room)"
    short = "((SELECT allowed FROM room) - (SELECT COUNT(*) FROM first))"
    room = f"(NOT EXISTS (SELECT 1 FROM first WHERE first.v = {{v}}) AND {_ACTIVE} < %(climit)s)"
    walk = _walk(
        "concurrency_value",
        has_room=room,
        wanted=short,
        start=f"{short} > 0 AND (SELECT COUNT(*) FROM head) = {scan}",
    )
    return f""", head AS MATERIALIZED (
            SELECT t.id, t.concurrency_value AS v, t.priority, t.created_at FROM {{task}} t
            WHERE t.scheduler_id = %(sid)s AND t.status = 'QUEUED'
                AND t.not_before <= (SELECT now FROM room)
                AND (t.expires_at IS NULL OR t.expires_at > (SELECT now FROM room))
            ORDER BY t.priority, t.created_at, t.id LIMIT {scan}
        ), active AS MATERIALIZED (
            SELECT d.v, {_ACTIVE.replace("{v}", "d.v")} AS n
            FROM (SELECT DISTINCT head.v FROM head WHERE head.v IS NOT NULL) d
        ), ranked AS (
            SELECT h.id, h.priority, h.created_at, h.v, COALESCE(a.n, 0) AS n,
                row_number() OVER (PARTITION BY h.v ORDER BY h.priority, h.created_at, h.id) AS rn
            FROM head h LEFT JOIN active a ON a.v = h.v
        ), first AS MATERIALIZED (
            SELECT r.id, r.v FROM ranked r WHERE r.v IS NULL OR r.rn + r.n <= %(climit)s
            ORDER BY r.priority, r.created_at, r.id LIMIT (SELECT allowed FROM room)
        ){walk}, picked AS MATERIALIZED (
            SELECT t.id FROM {{task}} t
            WHERE t.id IN (SELECT id FROM first UNION ALL SELECT head FROM heads)
            FOR UPDATE OF t SKIP LOCKED
        ), verdict AS (
            SELECT CASE WHEN EXISTS (SELECT 1 FROM first) OR EXISTS (SELECT 1 FROM heads)
                THEN 'held' WHEN (SELECT yes FROM walk_cut) THEN 'more' ELSE 'empty' END AS why
        ), new_cursor AS (SELECT (SELECT v FROM heads ORDER BY steps DESC LIMIT 1) AS v)"""


def _fair_pick() -> str:
    """Round robin over the fair values from the cursor: the next value is one seek of
    task_fair_idx, its head another; a batch takes one head per value (a batch that needs
    second heads, or a long run of values with nothing due, is tasks.flow's loop)."""
    walk = _walk(
        "fair_value",
        has_room="TRUE",
        wanted="(SELECT allowed FROM room)",
        start="(SELECT allowed FROM room) > 0",
    )
    return f"""{walk}, picked AS MATERIALIZED (
            SELECT t.id FROM {{task}} t WHERE t.id IN (SELECT head FROM heads)
                AND (SELECT COUNT(*) FROM heads) = (SELECT allowed FROM room)
            FOR UPDATE OF t SKIP LOCKED
        ), verdict AS (
            SELECT CASE WHEN (SELECT COUNT(*) FROM heads) = 0 AND NOT (SELECT yes FROM walk_cut)
                THEN 'empty' ELSE 'more' END AS why
        ), new_cursor AS (SELECT (SELECT v FROM heads ORDER BY steps DESC LIMIT 1) AS v)"""


def _tail_sql(
    *, rate: bool, mint_token: bool, single: bool, prune: bool, took: str = "'ok'"
) -> str:
    """Claim by compare-and-swap, events, the window's row (rate), with `prune` the window's
    rows that left it (see handout_sql), the state row
    (total and cursor: every hand-out changes it, which is what `fresh` tests); then the
    claimed rows (with `took`, SQL: "ok", or how the pick found them), or one row of NULLs
    that says why nothing was taken (a left join of `room` and `claimed`: the UNION ALL of
    the claimed rows and a row of NULLs with a subquery per reason it replaced cost a
    crowded pop of one some 10 % of its server time). `single`: the pick takes one task at
    most, claimed by an equality on its id (`IN` planned a hash aggregate, whose set-up on
    every run cost a pop of one some 35 µs of the backend's CPU)."""
    n = {
        **_names(),
        "state": connection.ops.quote_name(FlowState._meta.db_table),
        "handout": connection.ops.quote_name(FlowHandout._meta.db_table),
    }
    token = f", lease_token = {new_lease_token().text}" if mint_token else ""
    window = ""
    if rate:
        window = f""", logged AS (
            INSERT INTO {n["handout"]} (scheduler_id, at_us, count, total)
            SELECT %(sid)s, room.now_us, c.n, room.handed_out + c.n
            FROM room, (SELECT COUNT(*) AS n FROM claimed) c WHERE c.n > 0
        )"""
    if rate and prune:
        window += f""", pruned AS (
            DELETE FROM {n["handout"]} WHERE scheduler_id = %(sid)s
                AND at_us <= (SELECT now_us FROM room) - %(window_us)s
                AND EXISTS (SELECT 1 FROM claimed)
        )"""
    claim = "= (SELECT id FROM picked LIMIT 1)" if single else "IN (SELECT id FROM picked)"
    return f""", claimed AS (
            UPDATE {n["task"]} t SET status = 'DISPATCHED', attempts = t.attempts + 1,
                lease_expires_at = room.now + make_interval(secs => %(lease_seconds)s),
                worker = %(worker)s, modified_at = room.now{token}
            FROM room WHERE t.id {claim} AND t.status = 'QUEUED'
            RETURNING {_returned("t")}
        ), events AS (
            INSERT INTO {n["event"]} (task_id, from_status, to_status, at, actor, note)
            SELECT id, 'QUEUED', 'DISPATCHED', modified_at, %(worker)s, %(note)s FROM claimed
        ){window}, bumped AS (
            UPDATE {n["state"]} SET handed_out = handed_out + (SELECT COUNT(*) FROM claimed),
                fair_cursor = COALESCE((SELECT v FROM new_cursor), fair_cursor)
            WHERE scheduler_id = %(sid)s AND EXISTS (SELECT 1 FROM claimed)
        )
        SELECT c.*, CASE WHEN c.id IS NOT NULL THEN {took}
            WHEN r.fresh IS NULL THEN CASE WHEN EXISTS (SELECT 1 FROM s) THEN 'nostate'
                ELSE 'other' END
            WHEN NOT r.fresh THEN 'stale'
            WHEN r.allowed <= 0 THEN 'blocked'
            ELSE (SELECT why FROM verdict) END AS why
        FROM (SELECT 1) one LEFT JOIN room r ON TRUE LEFT JOIN claimed c ON TRUE"""


# How many entries the single-task picks read before they answer "more" (a longer run of
# blocked values, or of values with nothing due, is for the full pick or tasks.flow's loop).
SINGLE_SCAN = 32
# The single-task concurrency pick's stretch in queue order (then it walks the values): the
# full pick's for a pop of one, so both take the same task. A shorter one walked the values
# past a due task of higher priority a few places behind a blocked head (review finding).
SINGLE_STRETCH = SCAN_FACTOR * 1 + SCAN_EXTRA
_DUE = """{t}.not_before <= (SELECT now FROM room)
    AND ({t}.expires_at IS NULL OR {t}.expires_at > (SELECT now FROM room))"""


def _concurrency_single_pick(*, walk: bool) -> str:
    """One task (the pops of one): the first in queue order whose value has room, among a
    short stretch. Without `walk`, a lazy filter of the stretch (a value's active tasks
    counted when its task comes up: a head with room costs one count) that answers "more"
    when the whole stretch is blocked; with it, the stretch is probed once per value
    (`_probe`) and a crowded one walks the values from the cursor until one has room and a
    due head, as the full pick does, and says so ("walked": tasks.flow keeps a crowded
    queue on this variant). Two variants because PostgreSQL sets up every node of a plan
    on each run, whether it runs or not: the walk's nodes would cost every pop of a queue
    whose head has room (tasks.flow picks the variant)."""
    if walk:
        return f"""{_probe()}{_single_walk()}, picked AS MATERIALIZED (
            SELECT t.id FROM {{task}} t
            WHERE t.id = COALESCE((SELECT id FROM first), (SELECT head FROM found))
            FOR UPDATE OF t SKIP LOCKED
        ), verdict AS (
            SELECT CASE WHEN EXISTS (SELECT 1 FROM first) OR EXISTS (SELECT 1 FROM found)
                THEN 'held' WHEN (SELECT MAX(steps) FROM walk) >= {1 + FAIR_EXTRA_STEPS}
                THEN 'more' ELSE 'empty' END AS why
        ), new_cursor AS (SELECT v FROM found)"""
    # The stretch is a CTE, read as far as `first` needs it (one row when the head has
    # room); the verdict counts the rest only when nothing was taken. As a subquery of each,
    # its index scan and InitPlans were in the plan twice, set up on every run.
    return f""", stretch AS MATERIALIZED (
            SELECT t.id, t.concurrency_value AS v FROM {{task}} t
            WHERE t.scheduler_id = %(sid)s AND t.status = 'QUEUED' AND {_DUE.format(t="t")}
            ORDER BY t.priority, t.created_at, t.id LIMIT {SINGLE_STRETCH}
        ), first AS MATERIALIZED (
            SELECT x.id FROM stretch x
            WHERE x.v IS NULL OR {_ACTIVE.replace("{v}", "x.v")} < %(climit)s
            LIMIT (SELECT allowed FROM room)
        ), picked AS MATERIALIZED (
            SELECT t.id FROM {{task}} t WHERE t.id = (SELECT id FROM first)
            FOR UPDATE OF t SKIP LOCKED
        ), verdict AS (SELECT CASE WHEN EXISTS (SELECT 1 FROM first) THEN 'held'
            WHEN (SELECT COUNT(*) FROM stretch) = {SINGLE_STRETCH}
            THEN 'more' ELSE 'empty' END AS why),
        new_cursor AS (SELECT NULL::text AS v)"""


def _probe() -> str:
    """The stretch (the first SINGLE_STRETCH due tasks in queue order, read only as far as
    needed) and `first`, the first of them whose value has room. Each step of `probe`
    takes the next task whose value no step before found blocked and counts that value's
    active tasks: a head crowded by one value at its limit costs one count, not one per
    task (they were most of a crowded pop's reads)."""
    active = _ACTIVE.replace("{v}", "x.v")
    # What the steps so far found blocked (the first row, before any step, has no value).
    blocked = "(CASE WHEN p.fits IS NULL THEN p.blocked ELSE p.blocked || p.v::text END)"
    return f""", stretch AS MATERIALIZED (
            SELECT t.id, t.concurrency_value AS v FROM {{task}} t
            WHERE t.scheduler_id = %(sid)s AND t.status = 'QUEUED' AND {_DUE.format(t="t")}
            ORDER BY t.priority, t.created_at, t.id LIMIT {SINGLE_STRETCH}
        ), probe(id, v, fits, blocked) AS (
            SELECT NULL::uuid, NULL::text, NULL::boolean, ARRAY[]::text[]
            WHERE (SELECT allowed FROM room) > 0
            UNION ALL
            SELECT x.id, x.v, x.v IS NULL OR {active} < %(climit)s, {blocked}
            FROM probe p, LATERAL (SELECT s.id, s.v FROM stretch s
                WHERE s.v IS NULL OR s.v <> ALL {blocked} LIMIT 1) x
            WHERE NOT p.fits OR p.fits IS NULL
        ), first AS MATERIALIZED (SELECT probe.id FROM probe WHERE probe.fits)"""


def _single_walk() -> str:
    """The values after the cursor (wrapping once), one seek of task_concurrency_idx each,
    when the stretch found nothing and was full (else there is nothing due to walk to);
    `found` is the first value with room and a due head. The walk runs only as far as
    `found` reads it (FAIR_EXTRA_STEPS values without a head end it: "more"), from a first
    row that carries the cursor and the clock, and each value's next, count and head
    appear once in the plan: the walk's nodes were most of a crowded pop's cost."""
    after = """(SELECT q.concurrency_value FROM {task} q WHERE q.scheduler_id = %(sid)s
        AND q.status = 'QUEUED' AND q.concurrency_value IS NOT NULL{bound}
        ORDER BY q.concurrency_value LIMIT 1)"""
    lowest = after.replace("{bound}", "")
    after = after.replace("{bound}", " AND q.concurrency_value > w.v")
    head = """SELECT h.id FROM {task} h WHERE h.scheduler_id = %(sid)s AND h.status = 'QUEUED'
        AND h.concurrency_value = w.v AND h.not_before <= w.now
        AND (h.expires_at IS NULL OR h.expires_at > w.now)
        ORDER BY h.priority, h.created_at, h.id LIMIT 1"""
    # The first row is the cursor itself (steps 0; none: start from the lowest value); past
    # the last value the walk wraps to the lowest, and ends on coming back past the cursor.
    return f""", walk(v, steps, wrapped, cursor, now) AS (
            SELECT r.fair_cursor::text, 0, FALSE, r.fair_cursor::text, r.now FROM room r
            WHERE r.allowed > 0 AND NOT EXISTS (SELECT 1 FROM first)
                AND (SELECT COUNT(*) FROM stretch) = {SINGLE_STRETCH}
            UNION ALL
            SELECT x.v, w.steps + 1, x.wrapped, w.cursor, w.now FROM walk w,
                LATERAL (SELECT COALESCE(n.v, CASE WHEN w.wrapped THEN NULL ELSE {lowest} END)
                        AS v, w.wrapped OR (n.v IS NULL AND w.v IS NOT NULL) AS wrapped
                    FROM (SELECT {after} OFFSET 0) n(v) OFFSET 0) x
            WHERE w.steps < {1 + FAIR_EXTRA_STEPS} AND x.v IS NOT NULL
                AND NOT (x.wrapped AND (w.cursor IS NULL OR x.v > w.cursor))
        ), found AS MATERIALIZED (
            SELECT w.v, h.id AS head FROM walk w, LATERAL ({head}) h
            WHERE w.steps > 0 AND {_ACTIVE.replace("{v}", "w.v")} < %(climit)s LIMIT 1
        )"""


def _fair_single_pick() -> str:
    """One task: the first due entry of task_fair_idx after the cursor (the head of the next
    value with a due task, as values are that index's first key), or once past the last
    value, from the first value up to the cursor's. Lazy: a due head is one entry read. Past
    SINGLE_SCAN entries with nothing due it answers "more" (tasks.flow's loop)."""
    entries = """SELECT t.id, t.fair_value AS v, t.not_before, t.expires_at FROM {{task}} t
        WHERE t.scheduler_id = %(sid)s AND t.status = 'QUEUED' AND t.fair_value IS NOT NULL{bound}
        ORDER BY t.fair_value, t.priority, t.created_at, t.id LIMIT {n}"""
    cursor = " AND t.fair_value > (SELECT fair_cursor FROM room)"
    after = entries.format(bound=cursor, n=SINGLE_SCAN)
    start = entries.format(bound="", n=SINGLE_SCAN)
    due = _DUE.format(t="x")
    # `after` is a CTE read as far as `ahead` needs it (one entry when the next head is
    # due), counted further only when `ahead` found none: as a subquery of both, its index
    # scan and InitPlans were in the plan twice, set up on every run.
    return f""", after AS MATERIALIZED ({after}
        ), ahead AS MATERIALIZED (
            SELECT x.id, x.v FROM after x WHERE {due} LIMIT (SELECT allowed FROM room)
        ), wrapped AS MATERIALIZED (
            SELECT x.id, x.v FROM ({start}) x
            WHERE NOT EXISTS (SELECT 1 FROM ahead)
                AND (SELECT COUNT(*) FROM after) < {SINGLE_SCAN}
                AND {due} AND x.v <= COALESCE((SELECT fair_cursor FROM room), x.v)
            LIMIT (SELECT allowed FROM room)
        ), picked AS MATERIALIZED (
            SELECT t.id FROM {{task}} t
            WHERE t.id = COALESCE((SELECT id FROM ahead), (SELECT id FROM wrapped))
            FOR UPDATE OF t SKIP LOCKED
        ), verdict AS (
            SELECT CASE WHEN EXISTS (SELECT 1 FROM ahead) OR EXISTS (SELECT 1 FROM wrapped)
                THEN 'held' WHEN EXISTS (SELECT 1 FROM {{task}} t WHERE t.scheduler_id = %(sid)s
                AND t.status = 'QUEUED' AND {_DUE.format(t="t")})
                THEN 'more' ELSE 'empty' END AS why
        ), new_cursor AS (
            SELECT (SELECT v FROM ahead UNION ALL SELECT v FROM wrapped LIMIT 1) AS v
        )"""


PICKS = {
    "order": _order_pick,
    "order1": _order_pick,
    "concurrency": _concurrency_pick,
    "fair": _fair_pick,
    "concurrency1": lambda: _concurrency_single_pick(walk=False),
    "concurrency1w": lambda: _concurrency_single_pick(walk=True),
    "fair1": _fair_single_pick,
}


# The picks that take one task at most (the pops of one: tasks.flow.SINGLE_PICKS).
SINGLE = {"order1", "concurrency1", "concurrency1w", "fair1"}
# How a pick's hand-out says it found its tasks: "walked" when the single-task concurrency
# pick passed a crowded stretch (tasks.flow then keeps that queue on the variant that walks).
TOOK = {"ok", "walked"}
_TOOK = {"concurrency1w": "(CASE WHEN EXISTS (SELECT 1 FROM found) THEN 'walked' ELSE 'ok' END)"}


def handout_sql(*, pick: str, rate: bool, mint_token: bool, prune: bool = True) -> str:
    """The hand-out statement; `prune` (rate): it also deletes the window's rows that left
    it. The callers prune on one hand-out in PRUNE_EVERY (tasks.flow): the DELETE node's
    set-up on every run (opening its table and indexes, its InitPlans) cost a rate pop about
    35 µs of the backend's CPU, a tenth of its extra over the plain pop. The rows left in
    the meantime (at most that many per process) lie before the window: its reads start at
    the window's edge in flow_handout_idx and never visit them."""

    def build() -> str:
        task = connection.ops.quote_name(Task._meta.db_table)
        body = PICKS[pick]().replace("{task}", task)
        head = _head_sql(rate=rate, concurrency=pick.startswith("concurrency"))
        if pick not in {"order", "order1", "fair1", "concurrency1"}:  # the walks recurse
            head = head.replace("WITH s AS", "WITH RECURSIVE s AS", 1)
        took = _TOOK.get(pick, "'ok'")
        single = pick in SINGLE
        tail = _tail_sql(rate=rate, mint_token=mint_token, single=single, prune=prune, took=took)
        return head + body + tail

    return _hot_sql(f"handout:{pick}:{rate}:{mint_token}:{prune}", build)


def handout(
    *, pick: str, rate: bool, mint_token: bool, params: Mapping[str, Any], prune: bool = True
) -> HandoutResult:
    """Run the one-statement hand-out (`params`: see the statement's %(name)s); the tasks in
    queue order (fair: in turn order), or why none were taken."""
    sql = handout_sql(pick=pick, rate=rate, mint_token=mint_token, prune=prune)
    rows = _fetch_tasks(sql, params, extras=("why",), prepared=True)
    tasks = [task for task in rows if task.why in TOOK]
    if not tasks:
        return HandoutResult([], rows[0].why if rows else OTHER)
    return HandoutResult(tasks, tasks[0].why)
