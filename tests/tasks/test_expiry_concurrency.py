"""Expiry under concurrency (DESIGN 9.4, issue 15 part 7): processes popping while the reaper
expires tasks on the real database. No task is ever handed out at or after its expires_at,
none is both handed out and expired, none is lost. Runs on both legs (SQLite serialises the
writers; PostgreSQL is the real test: SKIP LOCKED on both sides)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from tasks import housekeeping, services
from tasks.models import Task, TaskEvent, TaskStatus
from tests.processes import run_in_processes
from tests.support.seed import seed_queued

pytestmark = [pytest.mark.concurrency, pytest.mark.django_db(transaction=True)]

PROCESSES = 9  # 8 poppers and the reaper
S = TaskStatus


def _queued_left() -> bool:
    return Task.objects.filter(scheduler_id="exp", status=S.QUEUED).exists()


def _work(index: int, window: float) -> int:
    """Process 0 reaps expiries until nothing is QUEUED; the others pop until nothing left
    is poppable. Each returns how many tasks it moved."""
    moved = 0
    stop_at = time.monotonic() + window + 120  # a safety net, not a timing assertion
    while time.monotonic() < stop_at:
        if index == 0:
            moved += housekeeping.tasks_expire_due(batch_size=50)
            if not _queued_left():
                return moved
        else:
            popped = services.task_pop(scheduler_id="exp", limit=5, worker=f"w{index}")
            moved += len(popped)
            poppable = Task.objects.filter(scheduler_id="exp", status=S.QUEUED).exclude(
                expires_at__lte=timezone.now()
            )
            if not popped and not poppable.exists():
                return moved
    raise AssertionError(f"process {index} still had work after the safety net")


def test_expiry__poppers_never_get_an_expired_task_and_none_is_lost() -> None:
    big = connection.vendor == "postgresql"
    window = 1.5 if big else 1.0
    services.scheduler_create(id="exp", lease_seconds=3600)
    now = timezone.now()
    seed_queued("exp", 300 if big else 100, expires_at=now - timedelta(seconds=1))  # gone
    seed_queued("exp", 300 if big else 100)  # never expires
    # Expiring while the others pop: each ends either handed out in time or EXPIRED.
    racing = 1200 if big else 300
    for n in range(20):
        at = now + timedelta(seconds=window * (n + 1) / 20)
        seed_queued("exp", racing // 20, expires_at=at)

    moved = run_in_processes(PROCESSES, _work, window)

    total = Task.objects.filter(scheduler_id="exp").count()
    statuses = Counter(Task.objects.filter(scheduler_id="exp").values_list("status", flat=True))
    assert set(statuses) <= {S.DISPATCHED, S.EXPIRED}, statuses
    assert sum(moved) == total == statuses[S.DISPATCHED] + statuses[S.EXPIRED]
    events = TaskEvent.objects.filter(task__scheduler_id="exp", from_status=S.QUEUED)
    per_task = Counter(events.values_list("task_id", flat=True))
    assert set(per_task.values()) == {1}, "a task left QUEUED twice (handed out and expired?)"
    late = [
        e.task_id
        for e in events.filter(to_status=S.DISPATCHED, task__expires_at__isnull=False)
        .select_related("task")
        .only("at", "task__expires_at")
        if e.at >= e.task.expires_at
    ]
    assert not late, f"{len(late)} tasks handed out at or after their expires_at"
    early = events.filter(to_status=S.EXPIRED).select_related("task")
    assert all(e.at >= e.task.expires_at for e in early), "a task expired before its time"
    # The sure cases: those expired from the start never ran, those without expiry all did.
    assert not Task.objects.filter(expires_at__lt=now, status=S.DISPATCHED).exists()
    assert not Task.objects.filter(expires_at__isnull=True, status=S.EXPIRED).exists()
