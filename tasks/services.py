"""Writes to the task queue. Every function is keyword-only, atomic, and changes task status only
by compare-and-swap with its TaskEvent in the same transaction: `transition`, or the worker's
one-statement claim and report in `queue`. Housekeeping (reaper, retention) is in
`tasks.housekeeping`."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from tasks import queue
from tasks.exceptions import (
    DuplicateTask,
    InvalidRequest,
    QueueFull,
    SchedulerNotFound,
    TaskNotFound,
    TransitionRefused,
)
from tasks.metrics import POP_SECONDS, TRANSITION_SECONDS
from tasks.models import (
    LEASED_STATUSES,
    Scheduler,
    SchedulerKind,
    Task,
    TaskStatus,
    is_allowed_transition,
)
from tasks.retry import RetrySpec

logger = logging.getLogger(__name__)

DISPATCHER = "dispatcher"

# Hooks run on commit: after tasks of a scheduler become QUEUED (the Celery dispatch fast path),
# and after a task completes (adaptive schedule intervals). Apps register them in ready().
on_queued_hooks: list[Callable[[Scheduler], None]] = []
on_completed_hooks: list[Callable[[Task], None]] = []


def _get_scheduler(scheduler_id: str, *, for_update: bool = False) -> Scheduler:
    queryset = Scheduler.objects.all()
    if for_update:
        # NO KEY UPDATE: serialises bounded pushes without blocking the FK checks of inserts.
        queryset = queryset.select_for_update(no_key=True)
    try:
        return queryset.get(id=scheduler_id)
    except Scheduler.DoesNotExist:
        raise SchedulerNotFound(f"Scheduler {scheduler_id!r} does not exist.") from None


def _get_task(task_id: uuid.UUID) -> Task:
    try:
        return Task.objects.select_related("scheduler").get(id=task_id)
    except Task.DoesNotExist:
        raise TaskNotFound(f"Task {task_id} does not exist.") from None


def notify_queued(scheduler: Scheduler) -> None:
    """After commit, tell the hooks that `scheduler` has new QUEUED tasks. They get the row the
    caller already holds, so a hook that only cares about some queues needs no query."""
    for hook in on_queued_hooks:
        transaction.on_commit(lambda hook=hook: hook(scheduler))


def transition(
    task: Task,
    *,
    to_status: str,
    actor: str,
    note: str = "",
    values: Mapping[str, Any] | None = None,
    fence_attempts: bool = False,
) -> Task:
    """Compare-and-swap `task` from the status it was read in to `to_status`, with its event."""
    from_status = task.status
    if not is_allowed_transition(from_status, to_status):
        raise TransitionRefused(
            f"Cannot move task {task.id} from {from_status} to {to_status}.",
            current_status=from_status,
        )
    now = timezone.now()
    assignments = {"status": to_status, "modified_at": now, **(values or {})}
    with TRANSITION_SECONDS.labels(to_status).time(), transaction.atomic():
        rows = queue.cas_update(
            task_ids=[task.id],
            expected=from_status,
            values=assignments,
            expected_attempts=task.attempts if fence_attempts else None,
        )
        if not rows:
            current = Task.objects.filter(id=task.id).values_list("status", flat=True).first()
            raise TransitionRefused(
                f"Task {task.id} changed while moving it from {from_status} to {to_status}; "
                f"it is {current or 'gone'} now.",
                current_status=current or "",
            )
        queue.record_events(rows, from_status=from_status, actor=actor, note=note, at=now)
    logger.info("task %s %s -> %s by %s %s", task.id, from_status, to_status, actor, note)
    updated = rows[0]
    if Task.scheduler.is_cached(task):
        updated.scheduler = task.scheduler  # spare the caller a second read
    return updated


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
    scheduler.save(update_fields=[*fields, "modified_at"])
    return scheduler


def scheduler_set_paused(*, scheduler_id: str, paused: bool, actor: str = "") -> Scheduler:
    with transaction.atomic():
        scheduler = _get_scheduler(scheduler_id, for_update=True)
        if scheduler.paused != paused:
            scheduler.paused = paused
            scheduler.modified_at = timezone.now()
            scheduler.save(update_fields=["paused", "modified_at"])
            logger.info(
                "scheduler %s %s by %s", scheduler_id, "paused" if paused else "resumed", actor
            )
    if not paused:
        notify_queued(scheduler)
    return scheduler


def scheduler_delete(*, scheduler_id: str) -> None:
    with transaction.atomic():
        scheduler = _get_scheduler(scheduler_id, for_update=True)
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
        scheduler.delete()


# --- push and pop ----------------------------------------------------------------------------


def task_push(
    *,
    scheduler_id: str,
    data: dict[str, Any] | None = None,
    priority: int = 0,
    hash: str | None = None,
    not_before: datetime | None = None,
    actor: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Task:
    """Queue a task. Refuses a second active task with the same hash, and a full queue."""
    now = timezone.now()
    with transaction.atomic():
        scheduler = _get_scheduler(scheduler_id)
        if scheduler.max_queue_size:
            # Bounded queues serialise their pushes so two cannot both take the last slot;
            # unbounded ones need no lock (dedup is the unique index's job).
            scheduler = _get_scheduler(scheduler_id, for_update=True)
            _check_room(scheduler)
        task = Task(
            scheduler=scheduler,
            data=data or {},
            priority=priority,
            hash=hash or None,
            not_before=not_before or now,
            created_at=now,
            modified_at=now,
            **(extra or {}),
        )
        try:
            with transaction.atomic():
                task.save(force_insert=True)
        except IntegrityError:
            raise _duplicate_of(scheduler_id, hash) from None
        queue.record_events([task], from_status="", actor=actor, note="pushed", at=now)
        notify_queued(scheduler)
    return task


def _check_room(scheduler: Scheduler) -> None:
    queued = Task.objects.filter(scheduler=scheduler, status=TaskStatus.QUEUED).count()
    if queued >= scheduler.max_queue_size:
        raise QueueFull(
            f"Scheduler {scheduler.id!r} is full: {queued} queued, max_queue_size is "
            f"{scheduler.max_queue_size}."
        )


def _duplicate_of(scheduler_id: str, hash: str | None) -> Exception:
    existing = (
        Task.objects.filter(
            scheduler_id=scheduler_id,
            hash=hash,
            status__in=[TaskStatus.QUEUED, *LEASED_STATUSES],
        )
        .values_list("id", flat=True)
        .first()
    )
    if existing is None:
        # The other task finished between our insert and this lookup; the caller may retry.
        return TransitionRefused(
            f"A task with hash {hash!r} was active a moment ago; try again.", current_status=""
        )
    return DuplicateTask(
        f"An active task with hash {hash!r} already exists in scheduler {scheduler_id!r}.",
        existing_id=existing,
    )


def task_pop(
    *,
    scheduler_id: str,
    limit: int = 1,
    filters: Mapping[str, Any] | None = None,
    worker: str = "",
) -> list[Task]:
    """Lease up to `limit` due tasks of a pull queue in queue order; an empty list when none is
    due or the scheduler is paused. Each popped task spends one attempt."""
    if not 1 <= limit <= settings.TASK_POP_MAX_LIMIT:
        raise InvalidRequest("limit", f"must be between 1 and {settings.TASK_POP_MAX_LIMIT}.")
    with POP_SECONDS.labels(scheduler_id).time():
        return _pop(scheduler_id=scheduler_id, limit=limit, filters=filters, worker=worker)


def _pop(
    *, scheduler_id: str, limit: int, filters: Mapping[str, Any] | None, worker: str
) -> list[Task]:
    now = timezone.now()
    if not filters and queue.ONE_STATEMENT_WRITES:
        # The hot path: one round trip; an empty answer says why in a second query.
        tasks = queue.pop_in_one_statement(
            scheduler_id=scheduler_id, limit=limit, now=now, worker=worker[:200]
        )
        if tasks:
            return tasks
    scheduler = _get_scheduler(scheduler_id)
    if scheduler.kind == SchedulerKind.CELERY:
        raise TransitionRefused(
            f"Scheduler {scheduler_id!r} is a celery queue: its tasks are dispatched to Celery "
            "workers, not popped.",
            current_status="",
        )
    if scheduler.paused or (not filters and queue.ONE_STATEMENT_WRITES):
        return []
    return _pop_filtered(scheduler, limit=limit, filters=filters, worker=worker, now=now)


def _pop_filtered(
    scheduler: Scheduler,
    *,
    limit: int,
    filters: Mapping[str, Any] | None,
    worker: str,
    now: datetime,
) -> list[Task]:
    values = {
        "status": TaskStatus.DISPATCHED,
        "attempts": queue.Sql('"attempts" + 1'),
        "lease_expires_at": now + timedelta(seconds=scheduler.lease_seconds),
        "worker": worker[:200],
        "modified_at": now,
    }
    with transaction.atomic():
        tasks = queue.claim_queued(
            scheduler_id=scheduler.id, limit=limit, now=now, values=values, filters=filters
        )
        queue.record_events(
            tasks, from_status=TaskStatus.QUEUED, actor=worker, note="popped", at=now
        )
    return tasks


# --- reports from runners --------------------------------------------------------------------


def _check_fence(task: Task, attempt: int | None) -> None:
    if attempt is not None and attempt != task.attempts:
        raise TransitionRefused(
            f"Task {task.id} is on attempt {task.attempts}, not {attempt}: its lease was "
            "taken back and the task handed out again.",
            current_status=task.status,
        )


def _refusal(task_id: uuid.UUID, attempt: int | None, to_status: str) -> TransitionRefused:
    """Why a one-statement compare-and-swap to `to_status` matched nothing (raises if gone)."""
    task = _get_task(task_id)
    _check_fence(task, attempt)
    if is_allowed_transition(task.status, to_status):
        # It was in a status the swap did not expect a moment ago, and is back in one now.
        return TransitionRefused(
            f"Task {task.id} changed while moving it to {to_status}; it is {task.status} now.",
            current_status=task.status,
        )
    return TransitionRefused(
        f"Cannot move task {task.id} from {task.status} to {to_status}.",
        current_status=task.status,
    )


def task_start(*, task_id: uuid.UUID, actor: str = "", attempt: int | None = None) -> Task:
    """DISPATCHED -> RUNNING with a fresh lease. The returned task carries `handler_name`, its
    scheduler's handler (what a Celery worker runs)."""
    with TRANSITION_SECONDS.labels(TaskStatus.RUNNING).time():
        task = queue.start_dispatched(
            task_id=task_id, attempt=attempt, now=timezone.now(), actor=actor
        )
    if task is None:
        raise _refusal(task_id, attempt, TaskStatus.RUNNING)
    logger.info("task %s DISPATCHED -> RUNNING by %s started", task.id, actor)
    return task


def task_complete(
    *,
    task_id: uuid.UUID,
    result: Any = None,
    actor: str = "",
    attempt: int | None = None,
) -> Task:
    with TRANSITION_SECONDS.labels(TaskStatus.COMPLETED).time():
        completed = queue.complete_leased(
            task_id=task_id, attempt=attempt, result=result, now=timezone.now(), actor=actor
        )
    if completed is None:
        raise _refusal(task_id, attempt, TaskStatus.COMPLETED)
    logger.info(
        "task %s %s -> COMPLETED by %s completed", completed.id, completed.from_status, actor
    )
    for hook in on_completed_hooks:
        # robust: the completion has committed (at once, in autocommit); a failing hook is
        # logged, and must not make the worker report it again or call it lost.
        transaction.on_commit(lambda hook=hook: hook(completed), robust=True)
    return completed


def task_fail(
    *,
    task_id: uuid.UUID,
    error: str = "",
    result: Any = None,
    actor: str = "",
    attempt: int | None = None,
    retry: RetrySpec | None = None,
) -> Task:
    """A failed attempt: retried (QUEUED after a backoff) while the policy allows, else FAILED,
    or DEAD when the queue dead-letters. A task whose cancel was requested ends CANCELLED."""
    task = _get_task(task_id)
    _check_fence(task, attempt)
    return fail_attempt(task, error=error, result=result, actor=actor, retry=retry)


def retry_spec_for(task: Task) -> RetrySpec:
    """A celery queue's tasks follow their handler's policy; a pull queue's, the queue's."""
    scheduler = task.scheduler
    if scheduler.kind == SchedulerKind.CELERY and scheduler.handler:
        from tasks.registry import HANDLERS

        handler = HANDLERS.get(scheduler.handler)
        if handler is not None:
            return handler.retry
    return RetrySpec.for_scheduler(scheduler)


def fail_attempt(
    task: Task, *, error: str, actor: str, result: Any = None, retry: RetrySpec | None = None
) -> Task:
    """End the leased attempt of `task` (as just read) as failed: retried after a backoff,
    FAILED or DEAD by `retry` (default: the task's own policy), CANCELLED if that was asked.
    Shared by runners' and workers' failure reports and the reaper."""
    if task.status not in LEASED_STATUSES:
        # Only a handed-out attempt can fail: without this, a late FAILED report on a CANCELLED
        # (or FAILED) task would pass as CANCELLED -> QUEUED, the operator's requeue edge.
        raise TransitionRefused(
            f"Cannot move task {task.id} from {task.status} to {TaskStatus.FAILED}.",
            current_status=task.status,
        )
    spec = retry or retry_spec_for(task)
    attempt_note = (
        f"attempt {task.attempts}/{spec.attempts_allowed} failed: {error or 'no error text'}"
    )
    values: dict[str, Any] = {"error": error, "result": result, "lease_expires_at": None}
    if task.cancel_requested_at is not None:
        to_status, note = TaskStatus.CANCELLED, f"{attempt_note}; cancel was requested"
    elif spec.should_retry(task.attempts):
        retry_at = timezone.now() + spec.delay_after(task.attempts)
        values.update(not_before=retry_at, worker="")
        to_status, note = TaskStatus.QUEUED, f"{attempt_note}; retry at {retry_at.isoformat()}"
    else:
        to_status = spec.exhausted_status()
        note = f"{attempt_note}; no attempts left"
    updated = transition(
        task, to_status=to_status, actor=actor, note=note, values=values, fence_attempts=True
    )
    if to_status == TaskStatus.QUEUED:
        notify_queued(task.scheduler)
    return updated


def task_report(
    *,
    task_id: uuid.UUID,
    status: str,
    result: Any = None,
    error: str = "",
    actor: str = "",
    attempt: int | None = None,
) -> Task:
    """The PATCH of a runner: RUNNING, COMPLETED or FAILED."""
    if status == TaskStatus.RUNNING:
        return task_start(task_id=task_id, actor=actor, attempt=attempt)
    if status == TaskStatus.COMPLETED:
        return task_complete(task_id=task_id, result=result, actor=actor, attempt=attempt)
    if status == TaskStatus.FAILED:
        return task_fail(task_id=task_id, error=error, result=result, actor=actor, attempt=attempt)
    raise InvalidRequest(
        "status", "must be RUNNING, COMPLETED or FAILED; use cancel/ or requeue/ for the rest."
    )


def task_heartbeat(
    *, task_id: uuid.UUID, attempt: int | None = None, lease_seconds: int | None = None
) -> Task:
    """Extend the lease of a DISPATCHED or RUNNING task. Refused once a cancel was requested,
    which is how a running holder learns to stop."""
    task = _get_task(task_id)
    _check_fence(task, attempt)
    if task.status not in LEASED_STATUSES:
        raise TransitionRefused(
            f"Task {task.id} is {task.status}; only DISPATCHED or RUNNING tasks have a lease.",
            current_status=task.status,
        )
    if task.cancel_requested_at is not None:
        raise TransitionRefused(
            f"Task {task.id} was cancelled; stop working on it and report.",
            current_status="CANCELLED",
        )
    seconds = lease_seconds or task.scheduler.lease_seconds
    lease = timezone.now() + timedelta(seconds=seconds)
    with transaction.atomic():
        rows = queue.cas_update(
            task_ids=[task.id],
            expected=task.status,
            values={"lease_expires_at": lease},
            expected_attempts=task.attempts,
        )
    if not rows:
        return task_heartbeat(task_id=task_id, attempt=attempt, lease_seconds=lease_seconds)
    return rows[0]


def task_hand_back(
    *,
    task_id: uuid.UUID,
    reason: str,
    actor: str = "",
    attempt: int | None = None,
    lock_wait: bool = False,
    notify: bool = True,
    unclaimed_only: bool = False,
) -> Task:
    """Put a leased task back in the queue without spending its attempt: its holder is
    shutting down, could not reach the broker, or a lock it needs is held. After a lock wait
    the task waits a short delay that doubles with each wait, from 0.5 s up to
    LOCK_WAIT_MAX_SECONDS. `notify=False` skips the on-commit fast-path dispatch (the
    dispatcher handing back what the broker refused must not send it again at once).
    `unclaimed_only` refuses a RUNNING task: the dispatcher does not know whether its message
    arrived, and must not pull a task from under the worker that claimed it."""
    task = _get_task(task_id)
    _check_fence(task, attempt)
    allowed = [TaskStatus.DISPATCHED] if unclaimed_only else LEASED_STATUSES
    if task.status not in allowed:
        raise TransitionRefused(
            f"Cannot hand back task {task.id}: it is {task.status}, "
            f"not {' or '.join(sorted(allowed))}.",
            current_status=task.status,
        )
    if task.cancel_requested_at is not None:
        note = f"handed back ({reason}); cancel was requested"
        values: dict[str, Any] = {"lease_expires_at": None}
        return transition(
            task,
            to_status=TaskStatus.CANCELLED,
            actor=actor,
            note=note,
            values=values,
            fence_attempts=True,
        )
    cap = settings.LOCK_WAIT_MAX_SECONDS
    delay = timedelta(seconds=min(cap, 0.5 * 2**task.lock_waits)) if lock_wait else timedelta()
    values = {
        "attempts": max(task.attempts - 1, 0),
        "not_before": timezone.now() + delay,
        "lease_expires_at": None,
        "worker": "",
        "lock_waits": task.lock_waits + (1 if lock_wait else 0),
    }
    handed = transition(
        task,
        to_status=TaskStatus.QUEUED,
        actor=actor,
        note=f"handed back, attempt not spent: {reason}",
        values=values,
        fence_attempts=True,
    )
    if notify:
        notify_queued(task.scheduler)
    return handed


# --- operator actions ------------------------------------------------------------------------


def task_cancel(*, task_id: uuid.UUID, actor: str = "") -> Task:
    """QUEUED and DISPATCHED tasks are cancelled at once; a RUNNING one is asked to stop (its
    next heartbeat is refused) and ends CANCELLED when it reports or its lease runs out."""
    task = _get_task(task_id)
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
    """Give a FAILED, DEAD or CANCELLED task a fresh set of attempts."""
    task = _get_task(task_id)
    values = {
        "attempts": 0,
        "not_before": timezone.now(),
        "lease_expires_at": None,
        "cancel_requested_at": None,
        "worker": "",
        "error": "",
        "result": None,
    }
    try:
        with transaction.atomic():
            updated = transition(
                task, to_status=TaskStatus.QUEUED, actor=actor, note=note, values=values
            )
    except IntegrityError:
        raise _duplicate_of(task.scheduler_id, task.hash) from None
    notify_queued(task.scheduler)
    return updated
