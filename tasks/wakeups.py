"""Waking long-polling pops when a pull queue gets work (DESIGN §9.3 `wait`).

On PostgreSQL a waiting pop LISTENs on one channel and sleeps in the driver until a NOTIFY
arrives (no query runs while it waits); whatever makes tasks of a pull queue QUEUED sends
`pg_notify(channel, scheduler id)` in its transaction, so the waiter wakes when that commits.
SQLite has no notifications: there the waiter re-checks every SQLITE_POLL_SECONDS.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from django.db import connection
from django.utils import timezone

from tasks.models import SchedulerKind, Task, TaskStatus

CHANNEL = "scheduler_queued"
SQLITE_POLL_SECONDS = 0.2


def channel_for(kind: str) -> str:
    """The channel a statement that queues tasks of a `kind` queue NOTIFYs itself ("" none)."""
    return CHANNEL if kind == SchedulerKind.PULL and connection.vendor == "postgresql" else ""


def announce(scheduler_id: str, kind: str) -> None:
    """Wake the pops waiting on a pull queue: sent with the caller's transaction (PostgreSQL
    delivers a NOTIFY at commit, or not at all on rollback)."""
    if not channel_for(kind):
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, scheduler_id])


@contextmanager
def listening() -> Iterator[None]:
    """LISTEN for the block's duration (before the first pop, so no wake-up between that pop
    and the wait is missed). The request's own connection, in autocommit: LISTEN takes effect
    at once and the notifications queue on it."""
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute(f"LISTEN {CHANNEL}")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"UNLISTEN {CHANNEL}")


def wait_for_work(scheduler_id: str, *, timeout: float) -> None:
    """Return when `scheduler_id` may have a due task, or after `timeout` seconds: a NOTIFY for
    it, or the moment its next delayed task (a retry's backoff) falls due."""
    timeout = min(timeout, _seconds_to_next_due(scheduler_id))
    if timeout <= 0:
        return
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        time.sleep(min(timeout, SQLITE_POLL_SECONDS))
        return
    deadline = time.monotonic() + timeout
    for notice in connection.connection.notifies(timeout=timeout):
        if notice.payload == scheduler_id or time.monotonic() >= deadline:
            return


def _seconds_to_next_due(scheduler_id: str) -> float:
    now = timezone.now()
    next_due: datetime | None = (
        Task.objects.filter(scheduler_id=scheduler_id, status=TaskStatus.QUEUED, not_before__gt=now)
        .order_by("not_before")
        .values_list("not_before", flat=True)
        .first()
    )
    return float("inf") if next_due is None else (next_due - now).total_seconds()
