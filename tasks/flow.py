"""Flow control: the hand-out path of schedulers with a `rate_limit`, a `concurrency_key` or a
`fair_key` (DESIGN §9.4). Pops (tasks.services) and dispatches (tasks.dispatch) of such a
queue both come here; the plain pop statement never hands out from one.

Exactness comes from one lock: every hand-out of a flow-controlled scheduler first locks its
FlowState row, in the transaction that then counts, picks, claims and logs. So the window and
active counts it reads cannot change under it by another hand-out (other writers only end
attempts, which makes the counts err on the safe side until they commit). The cost is that the
hand-outs of one such queue take turns (a few statements each); other queues are not touched.

- rate_limit: a sliding-window log (FlowHandout, one row per hand-out batch, pruned as it
  leaves the window). Exact: no window of the rate's length ever holds more than its count,
  where a token bucket of that size would allow up to twice as many across a refill. Cheap: at
  most `count` rows, summed through an index, and one row written per batch, not per task.
- concurrency_key: active counts per value from DISPATCHED + RUNNING (O(active) through
  task_status_idx); the queue head is scanned in order for a bounded stretch, and when blocked
  values crowd it, one seek per value (task_concurrency_idx) finds each other value's head.
- fair_key: round robin over values in their sort order, from a persisted cursor: the next
  value is one index seek (task_fair_idx) and its head another, whatever the number of values.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from tasks import queue
from tasks.flowkeys import Rate, parse_rate
from tasks.models import (
    ACTIVE_STATUSES,
    Scheduler,
    SchedulerKind,
    Task,
    TaskStatus,
    flow_value,
)

# How far down the queue a concurrency-limited pick reads in order before it switches to one
# seek per value: enough that a blocked value or two at the head costs nothing extra.
SCAN_FACTOR, SCAN_EXTRA = 2, 16


@dataclass
class Handout:
    tasks: list[Task]
    # Seconds until the rate limit allows the next hand-out (inf: the rate did not stop it).
    retry_in: float = math.inf
    # A delayed dispatch should be sent (rate-limited celery queues; at most one pending).
    send_retry: bool = False


@dataclass
class _State:
    cursor: str | None
    redispatch_at_us: int | None


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def claim(
    *,
    scheduler: Scheduler,
    limit: int,
    values_at: Callable[[datetime], Mapping[str, Any]],
    actor: str,
    note: str,
    filters: Mapping[str, Any] | None = None,
    retry_by_dispatch: bool = False,
    lease_seconds: int | None = None,
    mint_token: bool = False,
) -> Handout:
    """Hand out up to `limit` due tasks of a flow-controlled scheduler: as many as its rate
    allows now, none whose concurrency value is at its limit, in fair-share turns. The tasks
    get `values_at(now)` (status DISPATCHED, lease, …) and a "QUEUED → DISPATCHED" event.
    With `lease_seconds` (and `mint_token`: a lease token per task) `values_at` is that
    hand-out, which PostgreSQL can then do in one statement (tasks.queue.handout)."""
    if scheduler.kind == SchedulerKind.PULL and _pick(scheduler) is not None:
        _HINTS[scheduler.id] = scheduler
    if lease_seconds is not None and not filters:
        fast = _one_statement(scheduler, limit, actor, note, lease_seconds, mint_token)
        if fast is not None:
            return fast
    with transaction.atomic():
        state = _lock(scheduler.id)
        # Active counts first, then the clock: an attempt they saw end ended before `now`,
        # so the events' times show the limit held (tests rebuild the overlaps from them).
        room = _room(scheduler)
        now = timezone.now()  # read under the lock: hand-outs are logged in lock order
        rate = parse_rate(scheduler.rate_limit)
        allowed, window = limit, []
        if rate is not None:
            window = queue.flow_execute("flow_window", [scheduler.id, _us(now) - rate.window_us])
            allowed = min(limit, rate.count - sum(count for _, count in window))
            if allowed <= 0:
                return _rate_blocked(scheduler, state, window, rate, now, retry_by_dispatch)
        if _rate_only(scheduler, filters) and queue.ONE_STATEMENT_WRITES:
            # Pick and claim in one statement: nothing to skip, plain queue order.
            claims = {"in_order": (scheduler.id, allowed)}
            return Handout(_take(values_at(now), actor, note, now, scheduler, claims))
        take = _Take(scheduler, state, now, filters, values_at(now), actor, note)
        tasks = take.past_held(room, allowed)
    return Handout(tasks)


# How many times a hand-out picks again past tasks its claim found held by another
# transaction (each a cancel, an expiry batch or a key change's restamp in progress).
HELD_REPICKS = 3


@dataclass
class _Take:
    """Pick and claim under the queue's flow lock; `past_held` picks again when the claim
    took none of the picks (SKIP LOCKED passed them: another transaction holds them, or it
    changed them since they were read), so a later due task is handed out, not an empty
    answer. Nothing was claimed, so no token was spent, no window row or cursor saved, and
    the active counts (`room`, read under the lock) still hold: each round starts from them
    and from the saved cursor (a fair value whose head was held keeps its turn, with its
    next task)."""

    scheduler: Scheduler
    state: _State
    now: datetime
    filters: Mapping[str, Any] | None
    values: Mapping[str, Any]
    actor: str
    note: str

    def past_held(self, room: dict[str, int], allowed: int) -> list[Task]:
        passed: list[Any] = []
        for _ in range(1 + HELD_REPICKS):
            ids, tasks = self.once(
                _Picker(
                    scheduler=self.scheduler,
                    now=self.now,
                    filters=self.filters,
                    cursor=self.state.cursor,
                    room=dict(room),
                    passed=passed,
                ),
                allowed,
            )
            # Only PostgreSQL's claim skips a held row (SQLite's writers take turns).
            if tasks or not ids or not queue.ONE_STATEMENT_WRITES:
                return tasks
            passed = [*passed, *ids]
        return []

    def once(self, picker: _Picker, allowed: int) -> tuple[list[Any], list[Task]]:
        claims: dict[str, Any] = {"task_ids": picker.pick(allowed)}
        moved = picker.cursor != self.state.cursor
        if moved and queue.ONE_STATEMENT_WRITES and claims["task_ids"]:
            claims["cursor_save"] = (self.scheduler.id, picker.cursor)  # in the claim
        elif moved:
            _save(self.scheduler.id, picker.cursor, self.state.redispatch_at_us)
        tasks = _take(self.values, self.actor, self.note, self.now, self.scheduler, claims)
        return claims["task_ids"], tasks


# The flow-controlled pull queues this process popped from, by id: a pop of one tries the
# one-statement hand-out first, which checks these settings against the row (a changed
# queue answers "other", and the pop reads the row as for any queue).
_HINTS: dict[str, Scheduler] = {}


def pop_hinted(
    *,
    scheduler_id: str,
    limit: int,
    worker: str,
    values_for: Callable[[Scheduler, datetime], Mapping[str, Any]],
) -> Handout | None:
    """A pop of a flow-controlled pull queue seen before, without the plain pop statement
    and the scheduler read; None when this process knows no such queue by that id (or its
    settings changed: the caller then pops as for any queue)."""
    hint = _HINTS.get(scheduler_id)
    if hint is None or not queue.ONE_STATEMENT_WRITES:
        return None
    # Not _CHANGED: the statement found the row as `hint` says, so the locked path may use it.
    fast = _one_statement(hint, limit, worker, "popped", hint.lease_seconds, True)
    if fast is None:
        return claim(
            scheduler=hint,
            limit=limit,
            values_at=lambda at: values_for(hint, at),
            actor=worker,
            note="popped",
        )
    if fast is _CHANGED:
        _HINTS.pop(scheduler_id, None)
        return None
    return fast


_CHANGED = Handout([])  # the scheduler's row no longer matches (or is paused, or gone)
_PICKS = {(False, False): "order", (True, False): "concurrency", (False, True): "fair"}


def _pick(scheduler: Scheduler) -> str | None:
    """The one-statement hand-out's kind of pick for this queue; None: it has none."""
    return _PICKS.get((bool(scheduler.concurrency_key), bool(scheduler.fair_key)))


def _one_statement(
    scheduler: Scheduler, limit: int, actor: str, note: str, lease_seconds: int, mint_token: bool
) -> Handout | None:
    """PostgreSQL: the hand-out in one statement when its kind has one (not concurrency and
    fair share together); None when it must take the locked path (stale snapshot, rate
    full, a crowded head, …), _CHANGED when the settings did not match the row."""
    pick = _pick(scheduler)
    if not queue.ONE_STATEMENT_WRITES or pick is None:
        return None
    rate = parse_rate(scheduler.rate_limit)
    params: dict[str, Any] = {
        "sid": scheduler.id,
        "kind": scheduler.kind,
        "rate": scheduler.rate_limit,
        "ckey": scheduler.concurrency_key,
        "climit": scheduler.concurrency_limit,
        "fkey": scheduler.fair_key,
        "scheduler_lease": scheduler.lease_seconds,
        "limit": limit,
        "lease_seconds": lease_seconds,
        "worker": actor[:200],
        "note": note,
        "now": timezone.now(),  # the statement may move it later (see tasks.queue.handout)
    }
    if rate is not None:
        params |= {"rate_count": rate.count, "window_us": rate.window_us}
    prune = rate is not None and _prune_due(scheduler.id)
    result = _handout(pick, limit, rate is not None, mint_token, params, prune)
    if prune and not result.tasks:  # (a hand-out that took nothing prunes nothing)
        _SINCE_PRUNE.pop(scheduler.id, None)
    if result.status in queue.HANDOUT_TOOK or result.status == queue.HANDOUT_EMPTY:
        result.tasks.sort(key=lambda task: (task.priority, task.created_at, str(task.id)))
        return Handout(result.tasks)
    return _CHANGED if result.status == queue.HANDOUT_OTHER else None


# A rate-limited queue's one-statement hand-outs delete the window's old rows on one run in
# this many of this process (tasks.queue.handout_sql says why not on every run).
PRUNE_EVERY = 32
_SINCE_PRUNE: dict[str, int] = {}


def _prune_due(scheduler_id: str) -> bool:
    """Whether this hand-out of the queue prunes its window (the first of this process does)."""
    since = _SINCE_PRUNE.get(scheduler_id, 0)
    _SINCE_PRUNE[scheduler_id] = (since + 1) % PRUNE_EVERY
    return since == 0


def _handout(
    pick: str,
    limit: int,
    rate: bool,
    mint_token: bool,
    params: Mapping[str, Any],
    prune: bool = True,
) -> queue.HandoutResult:
    """A pop of one takes a single-task pick (lazy: it reads the one head it takes, where
    the full pick reads a stretch). When the lean one answers "more" (a head crowded by
    blocked values, or values with nothing due), the next in SINGLE_PICKS runs, and the
    queue's pops of one start there until FULL_PICK_RUN of them in a row did not need it
    (a hand-out that walked past a crowded head says so: "walked"). A crowded head stays
    crowded a while, and the smaller plan's run is then a statement wasted."""
    run = functools.partial(queue.handout, rate=rate, mint_token=mint_token, params=params)
    if limit != 1 or pick not in SINGLE_PICKS:
        return run(pick=pick, prune=prune)
    sid, picks = params["sid"], SINGLE_PICKS[pick]
    if _FULL_PICKS.get(sid) and len(picks) > 1:  # (its settings may have changed since)
        _FULL_PICKS[sid] -= 1
        picks = picks[1:]
    for kind in picks[:-1]:
        result = run(pick=kind, prune=prune)
        if result.status == "walked":
            _FULL_PICKS[sid] = FULL_PICK_RUN
        if result.status != "more":
            return result
        _FULL_PICKS[sid] = FULL_PICK_RUN
    return run(pick=picks[-1], prune=prune)


# The picks a pop of one tries in turn: the leaner first, the full one last (a rate limit
# alone: the same pick as a batch's, claiming by an equality on the one id).
SINGLE_PICKS = {
    "order": ("order1",),
    "concurrency": ("concurrency1", "concurrency1w", "concurrency"),
    "fair": ("fair1", "fair"),
}
FULL_PICK_RUN = 16
_FULL_PICKS: dict[str, int] = {}


def _rate_only(scheduler: Scheduler, filters: Mapping[str, Any] | None) -> bool:
    return not (scheduler.concurrency_key or scheduler.fair_key or filters)


def _lock(scheduler_id: str) -> _State:
    rows = queue.flow_execute("flow_state_lock", [scheduler_id])
    if not rows:  # the queue's first flow hand-out; two at once both insert, one row stays
        queue.flow_execute("flow_state_create", [scheduler_id])
        rows = queue.flow_execute("flow_state_lock", [scheduler_id])
    return _State(cursor=rows[0][0], redispatch_at_us=rows[0][1])


def _room(scheduler: Scheduler) -> dict[str, int]:
    """Free slots per concurrency value that has active tasks (the others have all)."""
    if not scheduler.concurrency_key:
        return {}
    active = queue.flow_execute("flow_active", [scheduler.id])
    return {value: scheduler.concurrency_limit - count for value, count in active}


def _save(scheduler_id: str, cursor: str | None, redispatch_at_us: int | None) -> None:
    queue.flow_execute("flow_state_save", [cursor, redispatch_at_us, scheduler_id])


def _log(scheduler_id: str, now: datetime, count: int, rate: Rate | None) -> None:
    if rate is not None:
        queue.flow_execute("flow_window_add", [scheduler_id, _us(now), count, count, scheduler_id])
        queue.flow_execute("flow_window_prune", [scheduler_id, _us(now) - rate.window_us])
    queue.flow_execute("flow_state_bump", [count, scheduler_id])


def next_token_in(window: list[tuple[int, int]], rate: Rate, now: datetime) -> float:
    """Seconds until the window (oldest first) has room for one more hand-out."""
    excess = sum(count for _, count in window) - rate.count + 1
    for at_us, count in window:
        excess -= count
        if excess <= 0:
            return max(0.001, (at_us + rate.window_us - _us(now)) / 1_000_000)
    return 0.001


def _rate_blocked(
    scheduler: Scheduler,
    state: _State,
    window: list[tuple[int, int]],
    rate: Rate,
    now: datetime,
    retry_by_dispatch: bool,
) -> Handout:
    retry_in = next_token_in(window, rate, now)
    if not retry_by_dispatch:
        return Handout([], retry_in)
    # One delayed dispatch pending per queue: every worker's refill would send its own.
    pending = state.redispatch_at_us is not None and state.redispatch_at_us > _us(now)
    if not pending:
        _save(scheduler.id, state.cursor, _us(now) + int(retry_in * 1_000_000))
    return Handout([], retry_in, send_retry=not pending)


def _take(
    values: Mapping[str, Any],
    actor: str,
    note: str,
    now: datetime,
    scheduler: Scheduler,
    claims: dict[str, Any],
) -> list[Task]:
    """Claim the picked tasks (`task_ids`, or the first `in_order`) by compare-and-swap, with
    their events and (rate-limited queues) the window's row; in pick order."""
    ids = claims.get("task_ids", [])
    if not ids and "in_order" not in claims:
        return []
    rate = parse_rate(scheduler.rate_limit)
    if queue.ONE_STATEMENT_WRITES:
        window = None if rate is None else (scheduler.id, _us(now), _us(now) - rate.window_us)
        rows = queue.flow_claim_ids(
            **claims,
            scheduler_id=scheduler.id,
            values=values,
            actor=actor,
            note=note,
            now=now,
            window_log=window,
        )
        if "in_order" in claims:
            return rows
    else:
        rows = queue.cas_update(task_ids=ids, expected=TaskStatus.QUEUED, values=values)
        queue.record_events(rows, from_status=TaskStatus.QUEUED, actor=actor, note=note, at=now)
        if rows:
            _log(scheduler.id, now, len(rows), rate)
    order = {uuid.UUID(str(task_id)): index for index, task_id in enumerate(ids)}
    rows.sort(key=lambda task: order[task.id])
    return rows


def restamp(scheduler: Scheduler, *, batch: int = 2000) -> int:
    """After the scheduler's concurrency_key or fair_key changed: its active tasks' values
    again from their data (finished tasks keep theirs: nothing reads them). O(active tasks),
    once per change of the setting; the caller's transaction makes it one change."""
    done = 0
    active = Task.objects.filter(scheduler_id=scheduler.id, status__in=ACTIVE_STATUSES)
    for task_id in active.order_by("id").values_list("id", flat=True)[::batch]:
        chunk = list(active.filter(id__gte=task_id).order_by("id").only("id", "data")[:batch])
        for task in chunk:
            task.concurrency_value = flow_value(task.data, scheduler.concurrency_key)
            task.fair_value = flow_value(task.data, scheduler.fair_key)
        Task.objects.bulk_update(chunk, ["concurrency_value", "fair_value"])
        done += len(chunk)
    return done


@dataclass
class _Picker:
    """Chooses which due tasks a hand-out takes, under the scheduler's flow lock."""

    scheduler: Scheduler
    now: datetime
    filters: Mapping[str, Any] | None
    cursor: str | None
    room: dict[str, int] = field(default_factory=dict)
    # Tasks an earlier round picked and its claim found held (tasks.flow._Take): not again.
    passed: list[Any] = field(default_factory=list)
    taken: list[Any] = field(default_factory=list)

    def pick(self, allowed: int) -> list[Any]:
        if self.scheduler.fair_key:
            self._fair(allowed)
        else:
            self._in_order(allowed)
        return self.taken

    def _has_room(self, value: str | None) -> bool:
        if value is None or not self.scheduler.concurrency_key:
            return True
        return self.room.get(value, self.scheduler.concurrency_limit) > 0

    def _take_one(self, task_id: Any, value: str | None) -> None:
        self.taken.append(task_id)
        if value is not None and self.scheduler.concurrency_key:
            self.room[value] = self.room.get(value, self.scheduler.concurrency_limit) - 1

    def _due(self) -> Any:
        due = Task.objects.filter(
            scheduler_id=self.scheduler.id, status=TaskStatus.QUEUED, not_before__lte=self.now
        ).exclude(expires_at__lte=self.now)  # an expired task is never handed out
        if self.passed:
            due = due.exclude(id__in=self.passed)
        return queue.data_filter(due, self.filters) if self.filters else due

    def _in_order(self, allowed: int) -> None:
        """Queue order, skipping tasks whose concurrency value has no room."""
        scan = allowed * SCAN_FACTOR + SCAN_EXTRA if self.scheduler.concurrency_key else allowed
        head = self._due().order_by("priority", "created_at", "id")
        rows = list(head.values_list("id", "concurrency_value")[:scan])
        for task_id, value in rows:
            if len(self.taken) == allowed:
                return
            if self._has_room(value):
                self._take_one(task_id, value)
        if len(self.taken) < allowed and len(rows) == scan and not self.filters:
            self._value_heads(allowed)

    def _value_heads(self, allowed: int) -> None:
        """Blocked values crowd the queue's head: take the heads of the values not at their
        limit, one per value, walking the values round robin from the queue's cursor (so
        no value waits on the ones before it in key order)."""
        for _ in range(3):  # from the cursor; from the start; once more for second heads
            wanted = allowed - len(self.taken)
            if not wanted:
                return
            from_start = self.cursor is None
            rows = self._walk(wanted, from_start)
            took = False
            for value, task_id in rows:
                if str(task_id) not in {str(t) for t in self.taken} and self._has_room(value):
                    self._take_one(task_id, value)
                    self.cursor, took = value, True
            if len(rows) < wanted:
                self.cursor = None  # the walk reached the last value: wrap around
            if from_start and not took:
                return

    def _walk(self, wanted: int, from_start: bool) -> list[tuple[str, Any]]:
        blocked = [value for value, room in self.room.items() if room <= 0]
        sid, now = self.scheduler.id, queue.flow_prep_now(self.now)
        taken = queue.prep_ids([*self.taken, *self.passed])
        sql = queue.flow_walk_sql(
            skip_ids=len(taken), skip_values=len(blocked), from_start=from_start
        )
        cursor = "" if from_start else self.cursor
        params = [sid, cursor, sid, *blocked, sid, now, now, *taken, wanted]
        params += [sid, now, now, *taken, *blocked, wanted]
        with connection.cursor() as db:
            db.execute(sql, params)
            return db.fetchall()

    def _fair(self, allowed: int) -> None:
        """Round robin over the fair values from the cursor; a full cycle that finds nothing
        to take ends the walk."""
        idle_wraps = 0
        while len(self.taken) < allowed and idle_wraps < 2:
            value = self._next_value()
            if value is None:
                if self.cursor is None:
                    return  # no fair value has a queued task
                self.cursor, idle_wraps = None, idle_wraps + 1
                continue
            self.cursor = value
            if self._fair_head(value):
                idle_wraps = 0

    def _next_value(self) -> str | None:
        if self.cursor is None:
            rows = queue.flow_execute("flow_fair_first", [self.scheduler.id, ""])
        else:
            rows = queue.flow_execute("flow_fair_next", [self.scheduler.id, self.cursor])
        return rows[0][0] if rows else None

    def _fair_head(self, value: str) -> bool:
        """Take the head of `value` (past this batch's and blocked ones); whether one was."""
        if self.scheduler.concurrency_key == self.scheduler.fair_key and not self._has_room(value):
            return False
        blocked = [v for v, room in self.room.items() if room <= 0]
        if self.filters:  # rare: filters and fair share; the ORM builds the filtered head
            return self._fair_head_filtered(value, blocked)
        skip = [*self.taken, *self.passed]
        sql = queue.flow_head_sql(skip_ids=len(skip), skip_values=len(blocked))
        now = queue.flow_prep_now(self.now)
        params = [self.scheduler.id, value, now, now, *queue.prep_ids(skip), *blocked]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        if row is None:
            return False
        self._take_one(row[0], row[1])
        return True

    def _fair_head_filtered(self, value: str, blocked: list[str]) -> bool:
        head = self._due().filter(fair_value=value).exclude(id__in=self.taken)
        if blocked:
            head = head.exclude(concurrency_value__in=blocked)
        row = head.order_by("priority", "created_at", "id").values_list("id", "concurrency_value")[
            :1
        ]
        found = list(row)
        if found:
            self._take_one(*found[0])
        return bool(found)
