"""Several dispatched tasks of one Celery message (`tasks.run_tasks`), run one after the other.

Each entry is `(task id, attempt)` and runs exactly as a message of its own would
(tasks.execution.execute): its claim is the compare-and-swap on that attempt, with its own
DISPATCHED -> RUNNING event at that moment, then the refill on claim, locks, heartbeat, report,
retries and dead letters. So whatever happened to an entry's task meanwhile, the entry runs it
at most once: a task cancelled, handed back by the claim timeout, or already run (a redelivered
message) is refused by the claim and skipped.

Nothing waits long behind the batch's head: once it has run WORKER_BATCH_MILLISECONDS, the
entries it has not started go back to the broker as one `tasks.run_task` message each, for
whichever workers are free. A batch's message is acknowledged late like any other: a worker
killed mid-batch leaves its finished tasks reported, its RUNNING one to the lease reaper, and
the rest DISPATCHED, handed back by the claim timeout and sent again (or claimed by the
redelivered message, whichever comes first).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from django.conf import settings

from scheduler_site import log_context
from tasks import dispatch, execution
from tasks.models import Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One task of a batch: what its claim names, and what a message of its own needs."""

    id: uuid.UUID
    attempts: int
    trace_context: str | None = None


def parse(entries: Sequence[Sequence[object]]) -> list[Entry]:
    """The message's `[[id, attempt], ...]` as entries."""
    return [Entry(uuid.UUID(str(task_id)), int(str(attempt))) for task_id, attempt in entries]


def execute_batch(
    entries: Sequence[Entry], *, worker: str, celery_queue: str, scheduler_id: str
) -> list[str]:
    """Run the entries in turn; what happened to each (execute's words, or "resent"). A
    successful report also claims the next entry while the batch has time left (one
    statement on PostgreSQL: tasks.execution.Chain)."""
    outcomes: list[str] = []
    clock = _Clock(time.monotonic() + settings.WORKER_BATCH_MILLISECONDS / 1000)
    previous: execution.Chain | None = None  # the last report, and what it claimed
    for number, entry in enumerate(entries):
        claimed = previous.claimed if previous is not None else None
        if number and claimed is None and clock.over():
            rest = entries[number:]
            if _resend(rest, celery_queue=celery_queue, scheduler_id=scheduler_id):
                return outcomes + ["resent"] * len(rest)
            clock.deadline = math.inf  # the broker failed: run them all here
        chain = execution.Chain(partial(_next, entries, number + 1, clock))
        outcomes.append(_execute_one(entry, worker=worker, chain=chain, claimed=claimed))
        previous = chain
    return outcomes


@dataclass
class _Clock:
    deadline: float

    def over(self) -> bool:
        return time.monotonic() >= self.deadline


def _next(entries: Sequence[Entry], index: int, clock: _Clock) -> tuple[uuid.UUID, int] | None:
    """The entry a report may claim with it: the next one, unless the batch is out of time
    (then it is sent again instead, with the rest)."""
    if index >= len(entries) or clock.over():
        return None
    return entries[index].id, entries[index].attempts


def _execute_one(entry: Entry, *, worker: str, chain: execution.Chain, claimed: Task | None) -> str:
    """One entry, with its task's log fields; `claimed`: the task, if the previous report
    claimed it (else it is claimed here). An error of one task's path (the database, say)
    is logged and the batch goes on: the task itself is left to its lease or claim timeout,
    as after the same error in a message of its own."""
    with log_context.bound(task_id=str(entry.id), attempt=entry.attempts):
        try:
            if claimed is None:
                return execution.execute(entry.id, entry.attempts, worker=worker, chain=chain)
            return execution.run_claimed(claimed, entry.attempts, worker=worker, chain=chain)
        except Exception:
            logger.exception("task %s attempt %s: run failed", entry.id, entry.attempts)
            return "error"


def _resend(rest: Sequence[Entry], *, celery_queue: str, scheduler_id: str) -> bool:
    """Send the entries not started as messages of their own; False if the broker failed
    (the batch then runs them itself: nothing is left waiting for the claim timeout)."""
    try:
        dispatch.resend_singly(rest, celery_queue=celery_queue, scheduler_id=scheduler_id)
    except Exception as exc:
        logger.warning(
            "could not resend %d tasks of a batch (%s): running them here", len(rest), exc
        )
        return False
    logger.info(
        "batch ran %s ms: %d tasks resent one a message",
        settings.WORKER_BATCH_MILLISECONDS,
        len(rest),
    )
    return True
