"""Writes to the task queue. Every function is keyword-only and atomic, and changes task status
only through the one writer (`tasks.transitions.transition`, or the queue's one-statement paths
in `tasks.queue`). Here: schedulers, push and pop, operator actions. Holders' reports are in
`tasks.reports`, housekeeping (reaper, retention) in `tasks.housekeeping`; the report services
are importable from here too."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from scheduler_site import tracing
from tasks import flow, queue, wakeups
from tasks.exceptions import (
    DuplicateTask,
    InvalidRequest,
    QueueError,
    QueueFull,
    SchedulerNotFound,
    TransitionRefused,
)
from tasks.metrics import POP_SECONDS, labelled
from tasks.models import (
    ACTIVE_STATUSES,
    LEASED_STATUSES,
    REQUEUEABLE_STATUSES,
    Scheduler,
    SchedulerKind,
    Task,
    TaskStatus,
    flow_value,
    read_flow_keys,
    stamp_flow_values,
)
from tasks.registry import check_task_data

# The report services and the writer's hooks, under the names callers have always used.
from tasks.reports import (  # noqa: F401
    fail_attempt,
    retry_spec_for,
    task_complete,
    task_complete_and_start,
    task_fail,
    task_hand_back,
    task_heartbeat,
    task_report,
    task_start,
)
from tasks.transitions import (  # noqa: F401
    DISPATCHER,
    get_scheduler,
    get_task,
    notify_queued,
    on_completed_hooks,
    on_failed_hooks,
    on_queued_hooks,
    transition,
)

logger = logging.getLogger(__name__)


# --- schedulers ------------------------------------------------------------------------------


def scheduler_create(*, id: str, **fields: Any) -> Scheduler:
    scheduler = Scheduler(id=id, **fields)
    scheduler.full_clean()
    scheduler.save(force_insert=True)
    return scheduler


def scheduler_update(*, scheduler: Scheduler, **fields: Any) -> Scheduler:
    for name, value in fields.items():
        setattr(scheduler, name, value)
    scheduler.modified_at = timezone.now()
    scheduler.full_clean()
    with transaction.atomic():
        keys_before = (scheduler.concurrency_key, scheduler.fair_key)
        if {"concurrency_key", "fair_key"} & fields.keys():
            keys_before = scheduler_lock_flow_keys(scheduler_id=scheduler.id)
        scheduler.save(update_fields=[*fields, "modified_at"])
        if (scheduler.concurrency_key, scheduler.fair_key) != keys_before:
            scheduler_flow_keys_changed(scheduler=scheduler)
    return scheduler


def scheduler_lock_flow_keys(*, scheduler_id: str) -> tuple[str, str]:
    """The scheduler's flow keys as committed, its row held FOR UPDATE to the end of the
    transaction: take it before saving new keys (scheduler_update, the admin). That lock
    (not the NO KEY UPDATE of a plain save) conflicts with the FOR KEY SHARE every task
    insert takes (its foreign-key check, and the stamping read of models.read_flow_keys or
    the hot push's guard): a task stamped from the old keys has committed before the restamp
    reads the active tasks, and every later one reads the new keys. Without it a push could
    stamp the old key's value after the restamp ran."""
    row = (
        Scheduler.objects.select_for_update()
        .filter(id=scheduler_id)
        .values_list("concurrency_key", "fair_key")
        .first()
    )
    if row is None:
        raise SchedulerNotFound(f"Scheduler {scheduler_id!r} does not exist.")
    return row


def scheduler_flow_keys_changed(*, scheduler: Scheduler) -> int:
    """The queue's concurrency_key or fair_key changed: its active tasks' key values again
    (they were taken from the data at push, under the old keys). The caller holds the row
    FOR UPDATE since before it saved the keys (scheduler_lock_flow_keys): locked after the
    save is too late, as a push's FOR KEY SHARE on the row version the save replaced does
    not conflict with the save's NO KEY UPDATE, so it would stamp the old keys unseen."""
    with transaction.atomic():
        restamped = flow.restamp(scheduler)
    logger.info(
        "scheduler %s: flow keys changed, %d active tasks restamped", scheduler.id, restamped
    )
    return restamped


def scheduler_set_paused(*, scheduler_id: str, paused: bool, actor: str = "") -> Scheduler:
    with transaction.atomic():
        scheduler = get_scheduler(scheduler_id, for_update=True)
        if scheduler.paused != paused:
            scheduler.paused = paused
            scheduler.modified_at = timezone.now()
            scheduler.save(update_fields=["paused", "modified_at"])
            logger.info(
                "scheduler %s %s by %s", scheduler_id, "paused" if paused else "resumed", actor
            )
    if not paused:
        notify_queued(scheduler, count=wakeups.EVERY_WAITER)  # all it holds may be due
    return scheduler


def scheduler_delete(*, scheduler_id: str) -> None:
    with transaction.atomic():
        scheduler = get_scheduler(scheduler_id, for_update=True)
        if scheduler.system:  # the system's own periodic work runs on it (DESIGN §9.2)
            raise TransitionRefused(
                f"Scheduler {scheduler_id!r} is a system queue (the system's own periodic work "
                "runs on it); system queues cannot be deleted.",
                current_status="SYSTEM",
            )
        active = scheduler.tasks.filter(status__in=[*LEASED_STATUSES, TaskStatus.QUEUED]).count()
        if active:
            raise TransitionRefused(
                f"Scheduler {scheduler_id!r} has {active} active tasks; cancel them or pause "
                "the scheduler and let them finish before deleting it.",
                current_status="ACTIVE",
            )
        tasks_lock_for_delete(scheduler.tasks.all())
        scheduler.delete()


def tasks_lock_for_delete(tasks: QuerySet[Task]) -> None:
    """Lock the tasks a cascade is about to delete, in the caller's transaction. Django deletes
    the events first and the tasks after, by id; events have no database constraint (0018),
    so a status change committed in between (its event with it: a requeue, a worker's report)
    would leave an event naming no task. Locked, a writer waits and then finds no row; one
    that had already written commits before the lock is granted, and its event is deleted
    with the others. (SQLite: the IMMEDIATE transaction keeps every other writer out. The
    admin deletes no task: events are append-only there, so it refuses any cascade to them.)"""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("tasks_lock_for_delete locks for the caller's transaction: use atomic()")
    if connection.features.has_select_for_update:
        list(tasks.select_for_update().values_list("id", flat=True))


# --- push and pop ----------------------------------------------------------------------------


def task_push(
    *,
    scheduler_id: str,
    data: dict[str, Any] | None = None,
    priority: int = 0,
    hash: str | None = None,
    not_before: datetime | None = None,
    expires_at: datetime | None = None,
    actor: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Task:
    """Queue a task. Refuses a second active task with the same hash, and a full queue. A
    task not handed out by `expires_at` never runs (the reaper ends it EXPIRED)."""
    now = timezone.now()
    fields = {
        "data": data or {},
        "priority": priority,
        "hash": hash or None,
        "not_before": not_before or now,
        "expires_at": expires_at,
        "created_at": now,
        "modified_at": now,
        "trace_context": tracing.current_traceparent(),
        **(extra or {}),
    }
    if queue.ONE_STATEMENT_WRITES:
        scheduler = _push_scheduler(scheduler_id)
        check_task_data(scheduler, fields["data"])
        if not scheduler.max_queue_size:
            pushed = _push_hot(scheduler, fields, actor=actor, at=now)
            if pushed is not None:
                return pushed
    with transaction.atomic():
        # The scheduler read inside the transaction the insert commits in, and its flow keys
        # stamped from it: on PostgreSQL the read is FOR NO KEY UPDATE (bounded queues
        # serialise their pushes so two cannot both take the last slot, and a key change's
        # FOR UPDATE waits for it or it for the change); on SQLite the IMMEDIATE transaction
        # already holds the write lock, so no key change can come between read and insert.
        scheduler = get_scheduler(scheduler_id, for_update=queue.ONE_STATEMENT_WRITES)
        check_task_data(scheduler, fields["data"])
        if scheduler.max_queue_size:
            _check_room(scheduler)
        task = Task(scheduler=scheduler, **fields)
        stamp_flow_values([task], from_cache=True)
        try:
            with transaction.atomic():
                task.save(force_insert=True)
        except IntegrityError as exc:
            refusal = _conflict_of(exc, scheduler_id, hash, task.schedule_id)
            if refusal is None:
                raise
            raise refusal from None
        note = tracing.noted("pushed", task.trace_context)
        queue.record_events([task], from_status="", actor=actor, note=note, at=now)
        notify_queued(scheduler)
    return task


# The unbounded pull queues this process pushed to, as last read (PostgreSQL's hot push):
# the push statement re-checks against the row every field a push of one relies on (kind,
# no bound, flow keys), so a copy that went stale costs one re-read, never a wrong push.
# Reading the row on every push was a round trip of its own, about a millisecond of an
# idle push → popped (README, "Long poll"). Pull queues only: a celery queue's push also
# reads `handler` (check_task_data) and `paused` (the dispatch hook), which are not checked.
_PUSH_SCHEDULERS: dict[str, Scheduler] = {}
_PUSH_SCHEDULERS_MAX = 1_000


def _push_scheduler(scheduler_id: str) -> Scheduler:
    known = _PUSH_SCHEDULERS.get(scheduler_id)
    if known is not None:
        return known
    scheduler = get_scheduler(scheduler_id)
    if scheduler.kind == SchedulerKind.PULL and not scheduler.max_queue_size:
        if len(_PUSH_SCHEDULERS) >= _PUSH_SCHEDULERS_MAX:
            _PUSH_SCHEDULERS.clear()  # many queues: start over rather than track use
        _PUSH_SCHEDULERS[scheduler_id] = scheduler
    return scheduler


def _push_hot(
    scheduler: Scheduler, fields: dict[str, Any], *, actor: str, at: datetime
) -> Task | None:
    """The hot path: one statement (insert, event, NOTIFY), which commits by itself; None
    when the queue turned out bounded meanwhile (the caller's ORM path pushes it)."""
    try:
        return _push_one_statement(scheduler, fields, actor=actor, at=at)
    except queue.StaleFlowKeys:
        # Its kind, bound or flow keys changed since the read (or the scheduler is gone):
        # once more with the row as it is now (the guard waited for a key change to commit).
        _PUSH_SCHEDULERS.pop(scheduler.id, None)
        fresh = _push_scheduler(scheduler.id)
        check_task_data(fresh, fields["data"])
        if fresh.max_queue_size:
            return None
        return _push_one_statement(fresh, fields, actor=actor, at=at, last=True)


def _push_one_statement(
    scheduler: Scheduler, fields: dict[str, Any], *, actor: str, at: datetime, last: bool = False
) -> Task:
    task = Task(scheduler=scheduler, **fields)
    note = tracing.noted("pushed", task.trace_context)
    channel = wakeups.channel_for(scheduler.kind)
    try:
        inserted = queue.insert_one_queued(
            task, actor=actor, note=note, at=at, wake_channel=channel
        )
    except queue.StaleFlowKeys:
        if not last:
            raise
        _PUSH_SCHEDULERS.pop(scheduler.id, None)
        # A second key change within the retry: rare enough to hand back (409), not loop.
        raise TransitionRefused(
            f"Scheduler {scheduler.id!r} changed its flow keys meanwhile; try again.",
            current_status="",
        ) from None
    if not inserted:
        raise _duplicate_of(scheduler.id, hash=fields["hash"], schedule_id=task.schedule_id)
    notify_queued(scheduler, announced=True)
    return task


def _check_room(scheduler: Scheduler) -> None:
    queued = Task.objects.filter(scheduler=scheduler, status=TaskStatus.QUEUED).count()
    if queued >= scheduler.max_queue_size:
        raise QueueFull(
            f"Scheduler {scheduler.id!r} is full: {queued} queued, max_queue_size is "
            f"{scheduler.max_queue_size}."
        )


def _conflict_of(
    exc: IntegrityError, scheduler_id: str, hash: str | None, schedule_id: Any
) -> Exception | None:
    """What a unique violation of a task that would be active means to the caller: another
    active task with its hash, or its schedule's active task (either a DuplicateTask naming
    it). None for any other integrity error: not a duplicate, the caller re-raises it."""
    conflict = queue.active_conflict(exc)
    if conflict == queue.ACTIVE_HASH:
        return _duplicate_of(scheduler_id, hash=hash)
    if conflict == queue.ACTIVE_SCHEDULE:
        # Its hash may be free: a schedule's hash can change between its tasks.
        return _duplicate_of(scheduler_id, schedule_id=schedule_id)
    return None


def _duplicate_of(
    scheduler_id: str, *, hash: str | None = None, schedule_id: Any = None
) -> Exception:
    """The refusal naming the active task that holds `hash` or (else) `schedule_id`."""
    for field, value, what in (
        ("hash", hash, f"with hash {hash!r}"),
        ("schedule_id", schedule_id, f"of schedule {schedule_id}"),
    ):
        if value is None:
            continue
        existing = (
            Task.objects.filter(scheduler_id=scheduler_id, status__in=ACTIVE_STATUSES)
            .filter(**{field: value})
            .values_list("id", flat=True)
            .first()
        )
        if existing is not None:
            return DuplicateTask(
                f"An active task {what} already exists in scheduler {scheduler_id!r}.",
                existing_id=existing,
            )
    # The other task finished between our insert and this lookup; the caller may retry.
    return TransitionRefused(
        f"A task with hash {hash!r} was active a moment ago; try again.", current_status=""
    )


def task_pop(
    *,
    scheduler_id: str,
    limit: int = 1,
    filters: Mapping[str, Any] | None = None,
    worker: str = "",
    wait: float = 0,
) -> list[Task]:
    """Lease up to `limit` due tasks of a pull queue in queue order; an empty list when none is
    due or the scheduler is paused. Each popped task spends one attempt. With `wait` seconds,
    an empty queue is waited on: the answer comes as soon as a task is due (woken by
    LISTEN/NOTIFY on PostgreSQL, by polling on SQLite), or empty after `wait`."""
    # The common pop (limit 1, no wait) is valid whatever the settings say: a settings lookup
    # goes through LazySettings' __getattribute__, measurable on a pop this short.
    if limit != 1 and not 1 <= limit <= settings.TASK_POP_MAX_LIMIT:
        raise InvalidRequest("limit", f"must be between 1 and {settings.TASK_POP_MAX_LIMIT}.")
    if wait != 0 and not 0 <= wait <= settings.TASK_POP_MAX_WAIT_SECONDS:
        raise InvalidRequest("wait", f"must be 0 to {settings.TASK_POP_MAX_WAIT_SECONDS} seconds.")
    pop = {"scheduler_id": scheduler_id, "limit": limit, "filters": filters, "worker": worker}
    if not wait:
        with labelled(POP_SECONDS, scheduler_id).time():
            tasks = _pop(**pop)[0]
        tracing.record_handouts("task.pop", tasks)
        return tasks
    deadline = time.monotonic() + wait
    with wakeups.listening(scheduler_id) as listener:
        while True:
            with labelled(POP_SECONDS, scheduler_id).time():
                tasks, next_token_in = _pop(**pop)
            remaining = deadline - time.monotonic()
            if tasks or remaining <= 0:
                tracing.record_handouts("task.pop", tasks)
                return tasks
            # A rate-limited queue: the wait also ends when its next token is due.
            wakeups.wait_for_work(
                scheduler_id, timeout=min(remaining, next_token_in), listener=listener
            )


def _pop(
    *, scheduler_id: str, limit: int, filters: Mapping[str, Any] | None, worker: str
) -> tuple[list[Task], float]:
    """The tasks popped, and the seconds until a rate-limited queue's next token (inf when
    the rate did not stop the pop)."""
    now = timezone.now()
    if not filters and queue.ONE_STATEMENT_WRITES:
        # A flow-controlled queue this process popped before: its own one statement.
        hinted = flow.pop_hinted(
            scheduler_id=scheduler_id, limit=limit, worker=worker, values_for=_hinted_values(worker)
        )
        if hinted is not None:
            return hinted.tasks, hinted.retry_in
        # The hot path: one round trip; an empty answer says why in a second query.
        tasks = queue.pop_in_one_statement(
            scheduler_id=scheduler_id, limit=limit, now=now, worker=worker[:200]
        )
        if tasks:
            return tasks, math.inf
    scheduler = get_scheduler(scheduler_id)
    if scheduler.kind == SchedulerKind.CELERY:
        raise TransitionRefused(
            f"Scheduler {scheduler_id!r} is a celery queue: its tasks are dispatched to Celery "
            "workers, not popped.",
            current_status="",
        )
    if scheduler.paused:
        return [], math.inf
    if scheduler.flow_controlled:  # never the plain statement's: it skips these queues
        handout = flow.claim(
            scheduler=scheduler,
            limit=limit,
            values_at=lambda at: _pop_values(scheduler, worker=worker, now=at),
            actor=worker,
            note="popped",
            filters=filters,
            lease_seconds=scheduler.lease_seconds,
            mint_token=True,
        )
        return handout.tasks, handout.retry_in
    if not filters and queue.ONE_STATEMENT_WRITES:
        return [], math.inf
    return _pop_filtered(scheduler, limit=limit, filters=filters, worker=worker, now=now), math.inf


def _hinted_values(worker: str) -> Callable[[Scheduler, datetime], dict[str, Any]]:
    return lambda scheduler, now: _pop_values(scheduler, worker=worker, now=now)


def _pop_values(scheduler: Scheduler, *, worker: str, now: datetime) -> dict[str, Any]:
    return {
        "status": TaskStatus.DISPATCHED,
        "attempts": queue.Sql('"attempts" + 1'),
        "lease_expires_at": now + timedelta(seconds=scheduler.lease_seconds),
        "worker": worker[:200],
        "modified_at": now,
        "lease_token": queue.new_lease_token(),
    }


def _pop_filtered(
    scheduler: Scheduler,
    *,
    limit: int,
    filters: Mapping[str, Any] | None,
    worker: str,
    now: datetime,
) -> list[Task]:
    values = _pop_values(scheduler, worker=worker, now=now)
    with transaction.atomic():
        tasks = queue.claim_queued(
            scheduler_id=scheduler.id, limit=limit, now=now, values=values, filters=filters
        )
        queue.record_events(
            tasks, from_status=TaskStatus.QUEUED, actor=worker, note="popped", at=now
        )
    return tasks


# --- operator actions ------------------------------------------------------------------------


def task_cancel(*, task_id: uuid.UUID, actor: str = "") -> Task:
    """QUEUED and DISPATCHED tasks are cancelled at once; a RUNNING one is asked to stop (its
    next heartbeat is refused) and ends CANCELLED when it reports or its lease runs out."""
    task = get_task(task_id)
    if task.status != TaskStatus.RUNNING:
        return transition(
            task,
            to_status=TaskStatus.CANCELLED,
            actor=actor,
            note="cancelled",
            values={"lease_expires_at": None},
        )
    if task.cancel_requested_at is not None:
        return task
    now = timezone.now()
    with transaction.atomic():
        rows = queue.cas_update(
            task_ids=[task.id], expected=TaskStatus.RUNNING, values={"cancel_requested_at": now}
        )
        if not rows:
            return task_cancel(task_id=task_id, actor=actor)
        queue.record_events(
            rows, from_status=task.status, actor=actor, note="cancel requested", at=now
        )
    return rows[0]


def task_requeue(*, task_id: uuid.UUID, actor: str = "", note: str = "requeued") -> Task:
    """Give a FAILED, DEAD, CANCELLED or EXPIRED task a fresh set of attempts (an EXPIRED one
    also loses its expiry: the operator wants it run). An active task is refused: requeueing
    a leased one would hand the same work out twice (its holder still runs it)."""
    task = get_task(task_id)
    if task.status not in REQUEUEABLE_STATUSES:
        raise TransitionRefused(
            f"Cannot requeue task {task.id}: it is {task.status}; only "
            f"{', '.join(sorted(REQUEUEABLE_STATUSES))} tasks can be requeued "
            "(cancel an active one first).",
            current_status=task.status,
        )
    values = {
        "attempts": 0,
        "not_before": timezone.now(),
        "expires_at": None,
        "lease_expires_at": None,
        "cancel_requested_at": None,
        "worker": "",
        "error": "",
        "traceback": "",
        "result": None,
    }
    try:
        with transaction.atomic():
            # The keys may have changed since it ended (the restamp skips finished tasks):
            # its values from the keys now, read under the lock a key change waits on.
            keys = read_flow_keys([task.scheduler_id]).get(task.scheduler_id, ("", ""))
            values["concurrency_value"] = flow_value(task.data, keys[0])
            values["fair_value"] = flow_value(task.data, keys[1])
            updated = transition(
                task, to_status=TaskStatus.QUEUED, actor=actor, note=note, values=values
            )
    except IntegrityError as exc:
        refusal = _conflict_of(exc, task.scheduler_id, task.hash, task.schedule_id)
        if refusal is None:
            raise
        raise refusal from None
    notify_queued(task.scheduler)
    return updated


def tasks_requeue_dead(
    *, scheduler_id: str, error: str | None = None, actor: str = "", limit: int = 1000
) -> tuple[int, list[str]]:
    """Requeue up to `limit` DEAD tasks of a queue (oldest first), only those whose `error` is
    exactly `error` when given: the dead-letter page's "requeue these". Returns how many were
    requeued and why the others were refused (a duplicate hash already active, …)."""
    dead = Task.objects.filter(scheduler_id=scheduler_id, status=TaskStatus.DEAD)
    if error is not None:
        dead = dead.filter(error=error)
    done, refused = 0, []
    for task_id in dead.order_by("modified_at", "id").values_list("id", flat=True)[:limit]:
        try:
            task_requeue(task_id=task_id, actor=actor, note="requeued from the dead letters")
            done += 1
        except QueueError as exc:
            refused.append(exc.message)
    return done, refused
