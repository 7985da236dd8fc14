"""The system's own periodic jobs. `manage.py setup_periodic_tasks` writes them as
django-celery-beat PeriodicTask rows; beat's DatabaseScheduler reads them from the database.
They run on the system queue (CELERY_SYSTEM_QUEUE), away from the handlers' queues."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings


@dataclass(frozen=True)
class PeriodicJob:
    name: str
    task: str
    every_seconds: int | None = None
    crontab: str | None = None  # 5 fields, UTC
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@functools.cache
def system_task_names() -> frozenset[str]:
    """The Celery task names of the system's jobs: routed to the system queue however they
    are sent (by beat, whose rows also name the queue, or by hand)."""
    return frozenset(job.task for job in system_jobs())


def route_system_jobs(name: str, *_: Any, **__: Any) -> dict[str, str] | None:
    """A Celery router (CELERY_TASK_ROUTES): the system's jobs go to the system queue; all
    else keeps its explicit queue (a scheduler's `celery_queue`) or Celery's default."""
    if name in system_task_names():
        return {"queue": settings.CELERY_SYSTEM_QUEUE}
    return None


def system_jobs() -> list[PeriodicJob]:
    return [
        PeriodicJob(
            name="scheduler: orchestrator tick",
            task="schedules.orchestrate",
            every_seconds=settings.ORCHESTRATOR_TICK_SECONDS,
            description="Turns due schedules into tasks, up to each queue's room.",
        ),
        PeriodicJob(
            name="scheduler: dispatcher",
            task="tasks.dispatch",
            every_seconds=settings.DISPATCH_INTERVAL_SECONDS,
            description="Sends QUEUED tasks of celery queues to workers, up to each threshold.",
        ),
        PeriodicJob(
            name="scheduler: lease reaper",
            task="tasks.reap_expired_leases",
            every_seconds=settings.REAPER_INTERVAL_SECONDS,
            description="Expired leases become failed attempts (retry policy decides).",
        ),
        PeriodicJob(
            name="scheduler: queue statistics",
            task="tasks.queue_stats_rollup",
            every_seconds=60,
            description="Rolls the last minutes' events up into per-queue, per-minute counts "
            "and queue-wait histograms (the dashboard's charts).",
        ),
        PeriodicJob(
            name="pilots: submit_pilots",
            task="pilots.start_cycle",
            every_seconds=60,
            kwargs={"cycle": "submit_pilots"},
            description="Per enabled VO: one submit_pilot task per free slot of its ACTIVE CEs.",
        ),
        PeriodicJob(
            name="pilots: check_pilots",
            task="pilots.start_cycle",
            every_seconds=30,
            kwargs={"cycle": "check_pilots"},
            description="Per enabled VO: advance pilot states from the CEs' news.",
        ),
        PeriodicJob(
            name="pilots: pilot_report",
            task="pilots.start_cycle",
            crontab="0 * * * *",
            kwargs={"cycle": "pilot_report"},
            description="Hourly: counts per status, CE and VO, stored and logged.",
        ),
        PeriodicJob(
            name="scheduler: prune finished tasks",
            task="tasks.prune_finished_tasks",
            crontab="17 * * * *",
            description="Deletes finished tasks past TASK_RETENTION_DAYS, in batches.",
        ),
    ]
