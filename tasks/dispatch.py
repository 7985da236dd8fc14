"""Dispatch: keep each celery queue at most `dispatch_threshold` tasks deep in the broker.

The database is the queue and the broker a short buffer (Software Heritage's lesson): a task
is flipped QUEUED→DISPATCHED under the scheduler's row lock (so concurrent dispatchers cannot
overfill), and only its id and attempt are sent, after commit. The worker claims it
DISPATCHED→RUNNING by compare-and-swap on that attempt, so a redelivered or stale message does
nothing. Runs periodically (beat), on commit after a push (fast path), and after each task a
worker finishes (to keep the pipeline full).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from tasks import flow, queue, services
from tasks.dispatch_messages import Sendable, round_sender, send_all
from tasks.exceptions import TransitionRefused
from tasks.metrics import DISPATCH_SECONDS
from tasks.models import Scheduler, SchedulerKind, Task, TaskStatus
from tasks.registry import HANDLERS

logger = logging.getLogger(__name__)


# Queues the one-query round found flow-controlled, and when (monotonic): for a while they
# take the ORM round straight away. Asking costs a locked round trip of its own, every round;
# a queue that stops being flow-controlled meanwhile is served by the ORM round just as well.
_FLOW_QUEUES: dict[str, float] = {}
FLOW_HINT_SECONDS = 60.0


def dispatch_scheduler(scheduler_id: str, *, skip_if_busy: bool = False) -> int:
    """Dispatch what fits under the threshold; the number of tasks sent. `skip_if_busy`:
    send nothing when another process holds the queue's row lock (it is dispatching, and
    fills the room itself) rather than wait for it and then find the room gone."""
    with DISPATCH_SECONDS.labels(scheduler_id).time():
        if _round_in_one_query(scheduler_id):
            sent = _dispatch_in_one_round_trip(scheduler_id, skip_if_busy=skip_if_busy)
            if sent is not None:
                return sent
            _FLOW_QUEUES[scheduler_id] = time.monotonic()
        return _dispatch_locked(scheduler_id, skip_if_busy=skip_if_busy)


def _round_in_one_query(scheduler_id: str) -> bool:
    if not (queue.ONE_STATEMENT_WRITES and queue.round_in_one_query_possible()):
        return False
    seen = _FLOW_QUEUES.get(scheduler_id)
    return seen is None or time.monotonic() - seen > FLOW_HINT_SECONDS


def _dispatch_in_one_round_trip(scheduler_id: str, *, skip_if_busy: bool) -> int | None:
    """PostgreSQL, a plain queue: the round in one query (tasks.queue.refill); None for a
    flow-controlled queue, which takes the ORM path of tasks.flow."""
    now = timezone.now()
    done = queue.dispatch_round(
        scheduler_id=scheduler_id,
        skip_if_busy=skip_if_busy,
        now=now,
        lease_until=_dispatch_values(now)["lease_expires_at"],
        actor=services.DISPATCHER,
        note="dispatched",
    )
    if done.flow:
        return None
    if done.tasks:
        tasks, handler_name, celery_queue = done.tasks, done.handler, done.celery_queue
        # Committed already in autocommit (the hook runs at once); inside a caller's atomic
        # block, once it commits, as before.
        transaction.on_commit(lambda: _send(tasks, handler_name, celery_queue, scheduler_id))
    return len(done.tasks)


def _dispatch_locked(scheduler_id: str, *, skip_if_busy: bool) -> int:
    """The round through the ORM, in a transaction holding the queue's row lock: SQLite, and
    flow-controlled queues on PostgreSQL."""
    with transaction.atomic():
        scheduler = (
            Scheduler.objects.select_for_update(no_key=True, skip_locked=skip_if_busy)
            .filter(id=scheduler_id, kind=SchedulerKind.CELERY, paused=False)
            .first()
        )
        if scheduler is None:
            return 0
        in_broker = Task.objects.filter(scheduler=scheduler, status=TaskStatus.DISPATCHED).count()
        room = scheduler.dispatch_threshold - in_broker
        if room <= 0:
            return 0
        if scheduler.flow_controlled:
            tasks: Sequence[Sendable] = _dispatch_flow(scheduler, room)
        else:
            now = timezone.now()
            tasks = claimed = queue.claim_queued(
                scheduler_id=scheduler.id, limit=room, now=now, values=_dispatch_values(now)
            )
            queue.record_events(
                claimed,
                from_status=TaskStatus.QUEUED,
                actor=services.DISPATCHER,
                note="dispatched",
                at=now,
            )
        handler_name, celery_queue = scheduler.handler, scheduler.celery_queue
        transaction.on_commit(lambda: _send(tasks, handler_name, celery_queue, scheduler.id))
    return len(tasks)


def _dispatch_values(now: datetime) -> dict[str, Any]:
    return {
        "status": TaskStatus.DISPATCHED,
        "attempts": queue.Sql('"attempts" + 1'),
        # Until a worker claims it, the lease is the claim timeout: a message the broker
        # lost must not hold the queue's threshold for a whole lease.
        "lease_expires_at": now + timedelta(seconds=settings.TASK_CLAIM_TIMEOUT_SECONDS),
        "worker": services.DISPATCHER,
        "modified_at": now,
    }


def _dispatch_flow(scheduler: Scheduler, room: int) -> list[Task]:
    """A flow-controlled celery queue: what its rate, concurrency and fair share allow. When
    the rate stopped it, one delayed dispatch is sent for its next token, so the queue runs
    at its rate rather than at the periodic dispatcher's."""
    handout = flow.claim(
        scheduler=scheduler,
        limit=room,
        values_at=_dispatch_values,
        actor=services.DISPATCHER,
        note="dispatched",
        retry_by_dispatch=True,
        lease_seconds=settings.TASK_CLAIM_TIMEOUT_SECONDS,  # as _dispatch_values
    )
    if handout.send_retry:
        countdown, scheduler_id = handout.retry_in, scheduler.id
        transaction.on_commit(
            lambda: current_app.send_task(
                "tasks.dispatch_scheduler",
                args=[scheduler_id],
                countdown=countdown,
                queue=settings.CELERY_SYSTEM_QUEUE,  # beside the periodic dispatcher
            )
        )
    return handout.tasks


def _send(
    tasks: Sequence[Sendable], handler_name: str, celery_queue: str, scheduler_id: str = ""
) -> None:
    handler = HANDLERS.get(handler_name)
    limits = {}
    if handler is not None:
        limits = {"soft_time_limit": handler.soft_time_limit, "time_limit": handler.time_limit}
    try:
        # The scheduler's own Celery queue: the workers started with `-Q` for it run its
        # tasks, so a queue of slow handlers has its own pool and delays nobody else's. The
        # scheduler travels in a header, for the worker's log fields (LOG_FORMAT=json). By
        # name, not through tasks.jobs (which imports this module): the worker runs whatever
        # is registered as tasks.run_task / tasks.run_tasks. No result is stored or awaited.
        with round_sender(celery_queue=celery_queue, scheduler_id=scheduler_id, **limits) as send:
            send_all(
                tasks, send, batch=message_batch(limits), spread=settings.DISPATCH_MESSAGE_SPREAD
            )
    except Exception as exc:  # the broker is outside our control: hand back, not lose
        # Which messages got through is uncertain (a batch fails as a whole, and some of its
        # commands may have run), so all the round's tasks go back. A message that did arrive
        # then finds its task QUEUED, or on another attempt, and does nothing; one already
        # claimed refuses the hand-back. No waiting out a connect timeout per task: the
        # periodic dispatcher sends them once the broker is back.
        logger.warning("broker unavailable (%s): handing back %d tasks", exc, len(tasks))
        for task in tasks:
            _hand_back_quietly(task, reason=f"broker unavailable: {exc}")


def message_batch(limits: dict[str, Any]) -> int:
    """How many tasks one message may carry (DISPATCH_MESSAGE_BATCH), or 1: Celery's soft and
    hard time limits are a message's, so a handler with either (or a worker-wide limit in
    Celery's configuration) gets one task a message, each under its own limit."""
    if (
        any(limits.values())
        or current_app.conf.task_time_limit
        or current_app.conf.task_soft_time_limit
    ):
        return 1
    return int(settings.DISPATCH_MESSAGE_BATCH)


def resend_singly(tasks: Sequence[Sendable], *, celery_queue: str, scheduler_id: str) -> None:
    """The tasks a batch had not started when it ran out of time (tasks.execution_batch): one
    message each, for whichever workers are free. Still DISPATCHED on the attempt they were
    sent with; a stale entry is refused by the claim's compare-and-swap. Raises on a broker
    error (the batch then runs them itself)."""
    with round_sender(celery_queue=celery_queue, scheduler_id=scheduler_id) as send:
        for task in tasks:
            send(task)


def _hand_back_quietly(task: Sendable, *, reason: str) -> int:
    # Refused: it already moved on (claimed, reaped or cancelled): nothing to hand back.
    # No fast path: it would dispatch the task again at once, to the broker that just failed,
    # over and over; the periodic dispatcher sends it once the broker is back. Any other error
    # is logged, not raised: the round's other tasks must still be handed back (one left
    # DISPATCHED without a message waits for its lease, and the reaper spends an attempt).
    try:
        services.task_hand_back(
            task_id=task.id,
            reason=reason,
            actor=services.DISPATCHER,
            attempt=task.attempts,
            notify=False,
            unclaimed_only=True,
        )
    except TransitionRefused:
        return 0
    except Exception:
        logger.exception("task %s: could not hand it back", task.id)
        return 0
    return 1


def dispatch_all() -> dict[str, int]:
    """The periodic round: first take back what no worker claimed in time, then fill every
    unpaused celery queue up to its threshold (which sends those again)."""
    hand_back_unclaimed()
    ids = Scheduler.objects.filter(kind=SchedulerKind.CELERY, paused=False).values_list(
        "id", flat=True
    )
    return {scheduler_id: dispatch_scheduler(scheduler_id) for scheduler_id in ids}


def hand_back_unclaimed(*, batch_size: int = 500) -> int:
    """DISPATCHED tasks of celery queues whose claim timeout has passed go back to QUEUED,
    attempt not spent. Their message was lost (a broker restart, a worker killed between the
    commit and the send) or waits behind busy workers; either way sending it again is safe:
    the worker's claim is a compare-and-swap on (DISPATCHED, attempt), so of two messages for
    one attempt only the first claims it and the other does nothing."""
    handed = 0
    for task in queue.unclaimed_expired(now=timezone.now(), limit=batch_size):
        reason = f"not claimed by a worker within {settings.TASK_CLAIM_TIMEOUT_SECONDS} s"
        handed += _hand_back_quietly(task, reason=reason)
    if handed:
        logger.warning("handed back %d dispatched tasks no worker claimed in time", handed)
    return handed


def on_queued(scheduler: Scheduler) -> None:
    """Fast path after tasks of a queue are QUEUED: pull and paused queues cost nothing here."""
    if scheduler.kind == SchedulerKind.CELERY and not scheduler.paused:
        _dispatch_quietly(scheduler.id)


def _dispatch_quietly(scheduler_id: str, *, skip_if_busy: bool = False) -> None:
    """Never raises: the periodic dispatcher is the safety net."""
    try:
        dispatch_scheduler(scheduler_id, skip_if_busy=skip_if_busy)
    except Exception:
        logger.exception(
            "fast-path dispatch for %s failed; the periodic dispatcher will retry", scheduler_id
        )


def refill_on_claim(task: Task) -> None:
    """After a worker claimed a task: top its queue's broker share up when the claim says so
    (`broker_room` is set once half of the threshold is free and something is QUEUED), which
    costs no query. Done before the handler runs, so a long handler does not leave the broker
    dry meanwhile. A full dispatch round (row lock, claim, events, send) after every single
    task made workers queue on the scheduler row."""
    room = getattr(task, "broker_room", None)
    if room is not None:
        # Another worker already dispatching this queue fills the room: waiting for its row
        # lock only to find the room gone cost a worker a third of its refills (measured).
        # But the holder fills the room it counted when it took the lock, and the row may be
        # held by an update or pause: the claim of the broker's last task (the room is the
        # whole threshold) waits for the lock, else the broker could stand empty until the
        # periodic dispatcher while tasks are QUEUED. The other claims' skipped refills are
        # made up by the later claims', which all refill while half the room is free.
        _dispatch_quietly(task.scheduler_id, skip_if_busy=room < task.dispatch_threshold)


def refill_after_run(task: Task) -> None:
    """After an attempt of a queue with a concurrency limit ended: its slot is free, so a
    task its value held back may go now (rather than at the next periodic round). Only such
    queues' tasks carry a concurrency value: the others cost nothing here."""
    if task.concurrency_value is not None:
        _dispatch_quietly(task.scheduler_id)


def connect() -> None:
    if on_queued not in services.on_queued_hooks:
        services.on_queued_hooks.append(on_queued)
