"""The one writer of task status: every change is a compare-and-swap from the status the task
was read in, checked against ALLOWED_TRANSITIONS, with its TaskEvent in the same transaction
(`transition`), or one of the queue's one-statement paths (`tasks.queue`). Also the hooks that
run on commit after tasks are queued or completed."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from tasks import queue, wakeups
from tasks.exceptions import SchedulerNotFound, TransitionRefused
from tasks.metrics import TRANSITION_SECONDS
from tasks.models import LEASED_STATUSES, Scheduler, Task, is_allowed_transition
from tasks.selectors import get_task  # noqa: F401  (its home was here: reports imports it)

logger = logging.getLogger(__name__)

DISPATCHER = "dispatcher"

# Hooks run on commit: after tasks of a scheduler become QUEUED (the Celery dispatch fast path),
# and after a task completes (adaptive schedule intervals). Apps register them in ready().
on_queued_hooks: list[Callable[[Scheduler], None]] = []
on_completed_hooks: list[Callable[[Task], None]] = []
# Run inside the transaction that ends a task FAILED or DEAD (not on commit): a schedule's
# failure cooldown commits with the failure, so no tick can run it again at full rate between
# the two. A hook that raises rolls the failure back with it.
on_failed_hooks: list[Callable[[Task], None]] = []


@functools.cache
def _scheduler_sql(vendor: str) -> str:
    """The ORM's own SELECT of one scheduler by id, compiled once per process: every push
    reads its scheduler, and building and compiling the queryset each time cost four times the read
    through raw() with this text (measured: 2.3 against 0.57 ms a call, the round trip
    included)."""
    sql, params = Scheduler.objects.filter(id="").query.get_compiler(using="default").as_sql()
    if list(params) != [""]:  # not an assert: `python -O` must not skip it
        raise RuntimeError(f"the scheduler read compiled to {params!r}, not one id placeholder")
    return sql


def get_scheduler(scheduler_id: str, *, for_update: bool = False) -> Scheduler:
    if for_update:
        # NO KEY UPDATE: serialises bounded pushes without blocking the FK checks of inserts.
        queryset = Scheduler.objects.select_for_update(no_key=True)
        found = list(queryset.filter(id=scheduler_id))
    else:
        found = list(Scheduler.objects.raw(_scheduler_sql(connection.vendor), [scheduler_id]))
    if not found:
        raise SchedulerNotFound(f"Scheduler {scheduler_id!r} does not exist.")
    return found[0]


def notify_queued(scheduler: Scheduler, *, announced: bool = False, count: int = 1) -> None:
    """After commit, tell the hooks that `scheduler` has new QUEUED tasks. They get the row the
    caller already holds, so a hook that only cares about some queues needs no query. Pops
    waiting on a pull queue are woken with the commit (tasks.wakeups), `count` of them (the
    tasks queued), unless the caller's own statement `announced` it already."""
    if not announced:
        wakeups.announce(scheduler.id, scheduler.kind, count)
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
    fence_token: str | None = None,
) -> Task:
    """Compare-and-swap `task` from the status it was read in to `to_status`, with its event.
    `fence_attempts` also requires the attempt it was read on, `fence_token` the lease token
    of its holder. Leaving the leased statuses clears the lease token: it never works again."""
    from_status = task.status
    if not is_allowed_transition(from_status, to_status):
        raise TransitionRefused(
            f"Cannot move task {task.id} from {from_status} to {to_status}.",
            current_status=from_status,
        )
    now = timezone.now()
    assignments = {"status": to_status, "modified_at": now, **(values or {})}
    if to_status not in LEASED_STATUSES:
        assignments["lease_token"] = ""
    with TRANSITION_SECONDS.labels(to_status).time(), transaction.atomic():
        rows = queue.cas_update(
            task_ids=[task.id],
            expected=from_status,
            values=assignments,
            expected_attempts=task.attempts if fence_attempts else None,
            expected_token=fence_token,
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
