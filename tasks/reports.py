"""What holders of a leased task report: started, completed, failed, still alive (heartbeat),
or handed back. Runners over REST and Celery workers alike; each report is fenced by the
attempt (when given) and the holder's lease token (tasks.leases), so a stale holder can never
report over a newer one."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from tasks import queue, transitions
from tasks.exceptions import InvalidRequest, QueueError, TransitionRefused
from tasks.leases import LeaseProof, check_holder, fence_token, with_override_note
from tasks.metrics import TRANSITION_SECONDS
from tasks.models import (
    LEASED_STATUSES,
    SchedulerKind,
    Task,
    TaskStatus,
    is_allowed_transition,
)
from tasks.registry import HANDLERS
from tasks.retry import RetrySpec
from tasks.transitions import get_task, notify_queued, transition

logger = logging.getLogger(__name__)


def _check_fence(task: Task, attempt: int | None, proof: LeaseProof | None) -> None:
    if attempt is not None and attempt != task.attempts:
        raise TransitionRefused(
            f"Task {task.id} is on attempt {task.attempts}, not {attempt}: its lease was "
            "taken back and the task handed out again.",
            current_status=task.status,
        )
    check_holder(task, proof)


def _refusal(
    task_id: uuid.UUID, attempt: int | None, proof: LeaseProof | None, to_status: str
) -> TransitionRefused:
    """Why a one-statement compare-and-swap to `to_status` matched nothing, or would (raises
    if the task is gone). An illegal move is named first: it says most."""
    task = get_task(task_id)
    _require_allowed(task, to_status)
    _check_fence(task, attempt, proof)
    # It was in a status the swap did not expect a moment ago, and is back in one now.
    return TransitionRefused(
        f"Task {task.id} changed while moving it to {to_status}; it is {task.status} now.",
        current_status=task.status,
    )


def _require_allowed(task: Task, to_status: str) -> None:
    # Only a handed-out attempt can be reported on: without the leased check, a late FAILED
    # report on a CANCELLED (or FAILED) task would pass as CANCELLED -> QUEUED, the
    # operator's requeue edge.
    if task.status not in LEASED_STATUSES or not is_allowed_transition(task.status, to_status):
        raise TransitionRefused(
            f"Cannot move task {task.id} from {task.status} to {to_status}.",
            current_status=task.status,
        )


def _fence_token_or_refusal(
    task_id: uuid.UUID, attempt: int | None, proof: LeaseProof | None, to_status: str
) -> str | None:
    """The token the one-statement write must match; a caller that must show one and did not
    is refused before anything is written, saying why."""
    try:
        return fence_token(proof, task_id=task_id, status="")
    except TransitionRefused:
        raise _refusal(task_id, attempt, proof, to_status) from None


def _fenced_write(
    write: Callable[..., Task | None],
    *,
    to_status: str,
    note: str,
    task_id: uuid.UUID,
    attempt: int | None,
    proof: LeaseProof | None,
    actor: str,
    **values: Any,
) -> Task:
    """One of the queue's one-statement writes (start, complete): fenced by the holder's lease
    token, timed, and refused saying why when its compare-and-swap matched nothing."""
    token = _fence_token_or_refusal(task_id, attempt, proof, to_status)
    with TRANSITION_SECONDS.labels(to_status).time():
        task = write(
            task_id=task_id,
            attempt=attempt,
            lease_token=token,
            now=timezone.now(),
            actor=actor,
            note=with_override_note(note, proof),
            **values,
        )
    if task is None:
        raise _refusal(task_id, attempt, proof, to_status)
    return task


def task_start(
    *,
    task_id: uuid.UUID,
    actor: str = "",
    attempt: int | None = None,
    proof: LeaseProof | None = None,
    mint_token: bool = False,
) -> Task:
    """DISPATCHED -> RUNNING with a fresh lease, held by `actor`. A worker's claim mints the
    lease token (`mint_token`); a runner's RUNNING report shows the one its pop minted. The
    returned task carries `handler_name`, its scheduler's handler (what a worker runs)."""
    task = _fenced_write(
        queue.start_dispatched,
        to_status=TaskStatus.RUNNING,
        note="started",
        task_id=task_id,
        attempt=attempt,
        proof=proof,
        actor=actor,
        mint_token=mint_token,
    )
    logger.info("task %s DISPATCHED -> RUNNING by %s started", task.id, actor)
    return task


def task_complete(
    *,
    task_id: uuid.UUID,
    result: Any = None,
    actor: str = "",
    attempt: int | None = None,
    proof: LeaseProof | None = None,
) -> Task:
    completed = _fenced_write(
        queue.complete_leased,
        to_status=TaskStatus.COMPLETED,
        note="completed",
        task_id=task_id,
        attempt=attempt,
        proof=proof,
        actor=actor,
        result=result,
    )
    logger.info(
        "task %s %s -> COMPLETED by %s completed", completed.id, completed.from_status, actor
    )
    for hook in transitions.on_completed_hooks:
        # robust: the completion has committed (at once, in autocommit); a failing hook is
        # logged, and must not make the worker report it again or call it lost.
        transaction.on_commit(lambda hook=hook: hook(completed), robust=True)
    return completed


def task_complete_and_start(
    *,
    task_id: uuid.UUID,
    result: Any,
    actor: str,
    attempt: int,
    proof: LeaseProof,
    next_id: uuid.UUID,
    next_attempt: int,
) -> tuple[Task | QueueError, Task | QueueError]:
    """A worker's successful report and its claim of its batch's next task: on PostgreSQL one
    statement (queue.complete_and_start), elsewhere task_complete then task_start. Each
    outcome on its own: the task, or the refusal that task_complete or task_start would
    have raised (a refused report does not stop the claim, nor a refused claim the report)."""
    if not queue.ONE_STATEMENT_WRITES:
        done = _outcome(lambda: task_complete(task_id=task_id, result=result, actor=actor,
                                              attempt=attempt, proof=proof))  # fmt: skip
        started = _outcome(lambda: task_start(task_id=next_id, actor=actor,
                                              attempt=next_attempt, mint_token=True))  # fmt: skip
        return done, started
    token = _fence_token_or_refusal(task_id, attempt, proof, TaskStatus.COMPLETED)
    with TRANSITION_SECONDS.labels(TaskStatus.COMPLETED).time():
        completed, started_task = queue.complete_and_start(
            task_id=task_id, attempt=attempt, lease_token=token or "", result=result,
            next_id=next_id, next_attempt=next_attempt, now=timezone.now(), actor=actor,
        )  # fmt: skip
    return _completed(completed, task_id, attempt, proof, actor), _started(
        started_task, next_id, next_attempt, actor
    )


def _outcome(call: Callable[[], Task]) -> Task | QueueError:
    try:
        return call()
    except QueueError as exc:
        return exc


def _completed(
    task: Task | None, task_id: uuid.UUID, attempt: int, proof: LeaseProof, actor: str
) -> Task | QueueError:
    if task is None:
        return _refused(task_id, attempt, proof, TaskStatus.COMPLETED)
    logger.info("task %s %s -> COMPLETED by %s completed", task.id, task.from_status, actor)
    for hook in transitions.on_completed_hooks:  # as task_complete's
        transaction.on_commit(lambda hook=hook: hook(task), robust=True)
    return task


def _started(task: Task | None, task_id: uuid.UUID, attempt: int, actor: str) -> Task | QueueError:
    if task is None:
        return _refused(task_id, attempt, None, TaskStatus.RUNNING)
    logger.info("task %s DISPATCHED -> RUNNING by %s started", task.id, actor)
    return task


def _refused(
    task_id: uuid.UUID, attempt: int, proof: LeaseProof | None, to_status: str
) -> QueueError:
    """What _refusal says (it raises most of its answers)."""
    try:
        return _refusal(task_id, attempt, proof, to_status)
    except QueueError as exc:
        return exc


# A traceback is kept whole up to this many characters; beyond it, its end (where it failed).
TRACEBACK_MAX_CHARS = 64_000


def task_fail(
    *,
    task_id: uuid.UUID,
    error: str = "",
    traceback: str = "",
    result: Any = None,
    actor: str = "",
    attempt: int | None = None,
    proof: LeaseProof | None = None,
    retry: RetrySpec | None = None,
) -> Task:
    """A failed attempt: retried (QUEUED after a backoff) while the policy allows, else FAILED,
    or DEAD when the queue dead-letters. A task whose cancel was requested ends CANCELLED."""
    task = get_task(task_id)
    _require_allowed(task, TaskStatus.FAILED)
    _check_fence(task, attempt, proof)
    return fail_attempt(
        task, error=error, traceback=traceback, result=result, actor=actor, retry=retry, proof=proof
    )


def retry_spec_for(task: Task) -> RetrySpec:
    """A celery queue's tasks follow their handler's policy, unless it has none of its own
    (`celery:` handlers); a pull queue's, the queue's."""
    scheduler = task.scheduler
    if scheduler.kind == SchedulerKind.CELERY and scheduler.handler:
        handler = HANDLERS.get(scheduler.handler)
        if handler is not None and handler.retry is not None:
            return handler.retry
    return RetrySpec.for_scheduler(scheduler)


def fail_attempt(
    task: Task,
    *,
    error: str,
    actor: str,
    traceback: str = "",
    result: Any = None,
    retry: RetrySpec | None = None,
    proof: LeaseProof | None = None,
) -> Task:
    """End the leased attempt of `task` (as just read) as failed: retried after a backoff,
    FAILED or DEAD by `retry` (default: the task's own policy), CANCELLED if that was asked.
    Shared by runners' and workers' failure reports and the reaper."""
    _require_allowed(task, TaskStatus.FAILED)
    spec = retry or retry_spec_for(task)
    attempt_note = (
        f"attempt {task.attempts}/{spec.attempts_allowed} failed: {error or 'no error text'}"
    )
    values: dict[str, Any] = {
        "error": error,
        "traceback": traceback[-TRACEBACK_MAX_CHARS:],
        "result": result,
        "lease_expires_at": None,
    }
    if task.cancel_requested_at is not None:
        to_status, note = TaskStatus.CANCELLED, f"{attempt_note}; cancel was requested"
    elif spec.should_retry(task.attempts):
        retry_at = timezone.now() + spec.delay_after(task.attempts)
        values.update(not_before=retry_at, worker="")
        to_status, note = TaskStatus.QUEUED, f"{attempt_note}; retry at {retry_at.isoformat()}"
    else:
        to_status = spec.exhausted_status()
        note = f"{attempt_note}; no attempts left"
    with transaction.atomic():
        updated = transition(
            task,
            to_status=to_status,
            actor=actor,
            note=with_override_note(note, proof),
            values=values,
            fence_attempts=True,
            fence_token=fence_token(proof, task_id=task.id, status=task.status),
        )
        if to_status in (TaskStatus.FAILED, TaskStatus.DEAD):
            for hook in transitions.on_failed_hooks:
                hook(updated)
    if to_status == TaskStatus.QUEUED:
        notify_queued(task.scheduler)
    return updated


def task_report(
    *,
    task_id: uuid.UUID,
    status: str,
    result: Any = None,
    error: str = "",
    traceback: str = "",
    actor: str = "",
    attempt: int | None = None,
    proof: LeaseProof | None = None,
) -> Task:
    """The PATCH of a runner: RUNNING, COMPLETED or FAILED (with its error and traceback)."""
    fenced = {"task_id": task_id, "actor": actor, "attempt": attempt, "proof": proof}
    if status == TaskStatus.RUNNING:
        return task_start(**fenced)
    if status == TaskStatus.COMPLETED:
        return task_complete(result=result, **fenced)
    if status == TaskStatus.FAILED:
        return task_fail(error=error, traceback=traceback, result=result, **fenced)
    raise InvalidRequest(
        "status", "must be RUNNING, COMPLETED or FAILED; use cancel/ or requeue/ for the rest."
    )


def task_heartbeat(
    *,
    task_id: uuid.UUID,
    attempt: int | None = None,
    lease_seconds: int | None = None,
    proof: LeaseProof | None = None,
) -> Task:
    """Extend the lease of a DISPATCHED or RUNNING task. Refused once a cancel was requested,
    which is how a running holder learns to stop."""
    task = get_task(task_id)
    if task.status not in LEASED_STATUSES:
        raise TransitionRefused(
            f"Task {task.id} is {task.status}; only DISPATCHED or RUNNING tasks have a lease.",
            current_status=task.status,
        )
    _check_fence(task, attempt, proof)
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
            expected_token=task.lease_token,
        )
    if not rows:
        return task_heartbeat(
            task_id=task_id, attempt=attempt, lease_seconds=lease_seconds, proof=proof
        )
    return rows[0]


def task_hand_back(
    *,
    task_id: uuid.UUID,
    reason: str,
    actor: str = "",
    attempt: int | None = None,
    proof: LeaseProof | None = None,
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
    task = get_task(task_id)
    allowed = [TaskStatus.DISPATCHED] if unclaimed_only else LEASED_STATUSES
    if task.status not in allowed:
        raise TransitionRefused(
            f"Cannot hand back task {task.id}: it is {task.status}, "
            f"not {' or '.join(sorted(allowed))}.",
            current_status=task.status,
        )
    _check_fence(task, attempt, proof)
    fenced = {
        "actor": actor,
        "fence_attempts": True,
        "fence_token": fence_token(proof, task_id=task.id, status=task.status),
    }
    if task.cancel_requested_at is not None:
        note = with_override_note(f"handed back ({reason}); cancel was requested", proof)
        values: dict[str, Any] = {"lease_expires_at": None}
        return transition(task, to_status=TaskStatus.CANCELLED, note=note, values=values, **fenced)
    cap = settings.LOCK_WAIT_MAX_SECONDS
    delay = timedelta(seconds=min(cap, 0.5 * 2**task.lock_waits)) if lock_wait else timedelta()
    values = {
        "attempts": max(task.attempts - 1, 0),
        "not_before": timezone.now() + delay,
        "lease_expires_at": None,
        "worker": "",
        "lock_waits": task.lock_waits + (1 if lock_wait else 0),
    }
    note = with_override_note(f"handed back, attempt not spent: {reason}", proof)
    handed = transition(task, to_status=TaskStatus.QUEUED, note=note, values=values, **fenced)
    if notify:
        notify_queued(task.scheduler)
    return handed
