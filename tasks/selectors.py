"""Reads that grow beyond one ORM call: counts per status, per-hour statistics, and the
queues a runner account is limited to."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, F, Max, Min, Q, QuerySet
from django.db.models.functions import TruncHour
from django.utils import timezone

from tasks.models import (
    LEASED_STATUSES,
    RunnerGrant,
    Scheduler,
    Task,
    TaskEvent,
    TaskStatus,
    Worker,
    WorkerKind,
)
from tasks.roles import OPERATORS

# The queues an account may use: None means every queue.
QueueScope = frozenset[str] | None


def runner_queues(user: AbstractBaseUser | AnonymousUser | None) -> QueueScope:
    """The queues a runner account is limited to (DESIGN 9.1), or None for every queue: an
    account without grants, and any operator, whatever grants it holds."""
    if user is None or not user.is_authenticated:
        return None
    granted = frozenset(
        RunnerGrant.objects.filter(user_id=user.pk).values_list("scheduler_id", flat=True)
    )
    if not granted or user.is_superuser or user.groups.filter(name=OPERATORS).exists():
        return None
    return granted


def scheduler_list(*, queues: QueueScope = None) -> QuerySet[Scheduler]:
    schedulers = Scheduler.objects.all()
    return schedulers if queues is None else schedulers.filter(id__in=queues)


def task_list(*, queues: QueueScope = None) -> QuerySet[Task]:
    tasks = Task.objects.all()
    return tasks if queues is None else tasks.filter(scheduler_id__in=queues)


def task_in_queues(task_id: Any, queues: frozenset[str]) -> bool:
    return Task.objects.filter(id=task_id, scheduler_id__in=queues).exists()


def status_counts(scheduler_ids: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """{scheduler_id: {status: count}} with every status present (zeros included)."""
    queryset = Task.objects.all()
    if scheduler_ids is not None:
        queryset = queryset.filter(scheduler_id__in=list(scheduler_ids))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TaskStatus.values, 0))
    rows = queryset.order_by().values("scheduler_id", "status").annotate(n=Count("id"))
    for row in rows:
        counts[row["scheduler_id"]][row["status"]] = row["n"]
    return counts


def hourly_stats(
    *, scheduler_id: str | None = None, hours: int = 24, queues: QueueScope = None
) -> list[dict[str, Any]]:
    """Transitions into each status per hour over the last `hours`, per scheduler, from the
    event history: a task that retried twice and then completed counts each step once. With
    `queues`, only those queues' (a limited runner's)."""
    since = timezone.now() - timedelta(hours=hours)
    # from == to marks a note (a cancel request), not a transition.
    events = TaskEvent.objects.filter(at__gte=since).exclude(from_status=F("to_status"))
    if scheduler_id:
        events = events.filter(task__scheduler_id=scheduler_id)
    if queues is not None:
        events = events.filter(task__scheduler_id__in=queues)
    rows = (
        events.annotate(hour=TruncHour("at"))
        .values("hour", "task__scheduler_id", "to_status")
        .annotate(count=Count("id"))
        .order_by("hour", "task__scheduler_id", "to_status")
    )
    return [
        {
            "hour": row["hour"],
            "scheduler": row["task__scheduler_id"],
            "status": row["to_status"],
            "count": row["count"],
        }
        for row in rows
    ]


def failed_attempts_q() -> Q:
    """Events that end a failed attempt: retried (leased -> QUEUED with fail_attempt's note,
    "attempt n/m failed: ..."; a hand-back's note differs) or final (-> FAILED or DEAD)."""
    retried = Q(to_status=TaskStatus.QUEUED, note__startswith="attempt ")
    final = Q(to_status__in=[TaskStatus.FAILED, TaskStatus.DEAD])
    return Q(from_status__in=LEASED_STATUSES) & (retried | final)


def hourly_failed_attempts(*, hours: int = 24) -> dict[datetime, int]:
    """{hour: failed attempts} over the last `hours`: every attempt that failed, retried or
    not, so that a queue failing 40 % of its attempts shows it even when retries succeed."""
    since = timezone.now() - timedelta(hours=hours)
    rows = (
        TaskEvent.objects.filter(failed_attempts_q(), at__gte=since)
        .annotate(hour=TruncHour("at"))
        .values("hour")
        .annotate(count=Count("id"))
        .order_by("hour")
    )
    return {row["hour"]: row["count"] for row in rows}


def dead_letter_groups(*, limit: int = 100) -> list[dict[str, Any]]:
    """DEAD tasks grouped by queue and exact error, largest group first: 500 dead tasks of
    one cause read as one line."""
    rows = (
        Task.objects.filter(status=TaskStatus.DEAD)
        .order_by()
        .values("scheduler_id", "error")
        .annotate(count=Count("id"), first=Min("modified_at"), last=Max("modified_at"))
        .order_by("-count", "scheduler_id", "error")
    )
    return list(rows[:limit])


# --- workers ---------------------------------------------------------------------------------


def worker_lost_after(kind: str) -> timedelta:
    """How long a worker of `kind` may stay unseen and still count as live. A runner idles in
    long-poll pops and between polls (RUNNER_LOST_AFTER_SECONDS); a Celery node's timer beats
    every WORKER_HEARTBEAT_SECONDS. Beat is judged by its jobs' intervals (health)."""
    if kind == WorkerKind.RUNNER:
        return timedelta(seconds=settings.RUNNER_LOST_AFTER_SECONDS)
    return timedelta(seconds=3 * settings.WORKER_HEARTBEAT_SECONDS)


def worker_is_live(worker: Worker, *, now: datetime | None = None) -> bool:
    now = now or timezone.now()
    return worker.stopped_at is None and worker.last_seen_at >= now - worker_lost_after(worker.kind)


def worker_state(worker: Worker, *, now: datetime | None = None) -> str:
    """live, stopped (shut down cleanly) or lost (not seen lately: killed, hung, cut off)."""
    if worker.stopped_at is not None:
        return "stopped"
    return "live" if worker_is_live(worker, now=now) else "lost"


def worker_list(*, kind: str | None = None) -> QuerySet[Worker]:
    workers = Worker.objects.order_by("kind", "name")
    return workers if kind is None else workers.filter(kind=kind)


def tasks_held_by(name: str) -> int:
    """Leased tasks whose holder is `name`: a scan of the leased rows only (task_lease_idx)."""
    return Task.objects.filter(status__in=LEASED_STATUSES, worker=name).count()


def active_work(*, now: datetime) -> dict[str, tuple[int, int]]:
    """{scheduler_id: (tasks due, tasks leased)} for the queues with any: QUEUED tasks whose
    not_before has come, and DISPATCHED or RUNNING ones. Reads the active rows only."""
    due = Q(status=TaskStatus.QUEUED, not_before__lte=now)
    rows = (
        # Two arms, so that PostgreSQL can read each one's partial index (queue and lease).
        Task.objects.filter(Q(status=TaskStatus.QUEUED) | Q(status__in=LEASED_STATUSES))
        .order_by()
        .values("scheduler_id")
        .annotate(
            due=Count("id", filter=due), leased=Count("id", filter=Q(status__in=LEASED_STATUSES))
        )
    )
    return {
        row["scheduler_id"]: (row["due"], row["leased"])
        for row in rows
        if row["due"] or row["leased"]
    }
