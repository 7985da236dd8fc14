"""Housekeeping of the task table, run by beat's periodic jobs and `manage.py task`: the
reaper (expired leases become failed attempts, tasks past their `expires_at` become EXPIRED)
and retention (finished tasks pruned)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from tasks import queue, services
from tasks.exceptions import TransitionRefused
from tasks.models import Scheduler, SchedulerKind, Task, TaskEvent, TaskStatus


def tasks_reap_expired(*, batch_size: int = 500, actor: str = "reaper") -> int:
    """Turn expired leases into failed attempts ("lost"); the retry policy decides what next."""
    reaped = 0
    while True:
        with transaction.atomic():
            expired = queue.lease_expired_ids(now=timezone.now(), limit=batch_size)
            for task in Task.objects.select_related("scheduler").filter(id__in=expired):
                try:
                    _reap(task, actor=actor)
                    reaped += 1
                except TransitionRefused:
                    continue  # reported or heartbeated meanwhile: not lost after all
        if len(expired) < batch_size:
            return reaped


def tasks_expire_due(*, batch_size: int = 1000, actor: str = "reaper") -> int:
    """End every QUEUED task past its `expires_at` as EXPIRED, a batch per transaction so no
    statement holds many row locks for long; how many."""
    expired = 0
    while True:
        done = queue.expire_due(now=timezone.now(), limit=batch_size, actor=actor)
        expired += done
        if done < batch_size:
            return expired


def _reap(task: Task, *, actor: str) -> None:
    if task.status == TaskStatus.DISPATCHED and task.scheduler.kind == SchedulerKind.CELERY:
        # Never claimed by a worker: its message was lost, no attempt was made; the
        # dispatcher sends it again (usually it took it back before the reaper came by).
        services.task_hand_back(
            task_id=task.id,
            reason="not claimed by a worker before its claim timeout",
            actor=actor,
            attempt=task.attempts,
            unclaimed_only=True,
        )
    else:
        services.fail_attempt(task, error="lease expired (lost)", actor=actor)


def tasks_prune(
    *,
    older_than: timedelta | None = None,
    dead_older_than: timedelta | None = None,
    batch_size: int = 1000,
) -> int:
    """Delete finished tasks (and their events) last changed before the retention age, in
    batches so no transaction holds locks for long. Dead letters are kept longer."""
    now = timezone.now()
    cutoffs = {
        TaskStatus.COMPLETED: older_than or timedelta(days=settings.TASK_RETENTION_DAYS),
        TaskStatus.FAILED: older_than or timedelta(days=settings.TASK_RETENTION_DAYS),
        TaskStatus.CANCELLED: older_than or timedelta(days=settings.TASK_RETENTION_DAYS),
        TaskStatus.EXPIRED: older_than or timedelta(days=settings.TASK_RETENTION_DAYS),
        TaskStatus.DEAD: dead_older_than or timedelta(days=settings.TASK_DEAD_RETENTION_DAYS),
    }
    deleted = 0
    for scheduler_id in Scheduler.objects.values_list("id", flat=True):
        for status, age in cutoffs.items():
            deleted += _prune_one(scheduler_id, status, now - age, batch_size)
    return deleted


def _prune_one(scheduler_id: str, status: str, cutoff: datetime, batch_size: int) -> int:
    deleted = 0
    while True:
        with transaction.atomic():
            doomed = Task.objects.filter(
                scheduler_id=scheduler_id, status=status, modified_at__lt=cutoff
            )
            if connection.features.has_select_for_update_skip_locked:
                # Locked until deleted: Django's delete removes tasks by id alone, so a task
                # requeued in between (by an operator, at that moment) would go, with the
                # event its requeue wrote (events have no database constraint to refuse
                # that). A row someone holds waits for the next prune. (SQLite: the
                # IMMEDIATE transaction already keeps every other writer out.)
                doomed = doomed.select_for_update(skip_locked=True)
            ids = list(doomed.values_list("id", flat=True)[:batch_size])
            if ids:
                TaskEvent.objects.filter(task_id__in=ids).delete()
                Task.objects.filter(id__in=ids, status=status).delete()
        deleted += len(ids)
        if len(ids) < batch_size:
            return deleted
