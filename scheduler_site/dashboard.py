"""The operator's dashboard at `/`: queues, throughput, dead letters, due schedules, pilots."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from pilots.models import PilotReport, PilotStatus
from pilots.services import pilot_counts
from scheduler_site import charts
from scheduler_site.health import system_health
from schedules.models import Schedule, ScheduleStatus
from tasks import selectors
from tasks.models import Scheduler, Task, TaskStatus

REFRESH_SECONDS = 15
QUEUE_KEYS = [TaskStatus.QUEUED, TaskStatus.DISPATCHED, TaskStatus.RUNNING]
OUTCOMES = [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.DEAD]
FAILED_ATTEMPTS = "failed attempts"


def _queues() -> dict[str, Any]:
    counts = selectors.status_counts()
    schedulers = list(Scheduler.objects.order_by("id"))
    rows = [(s.id + (" (paused)" if s.paused else ""), counts.get(s.id, {})) for s in schedulers]
    totals = {
        status: sum(c.get(status, 0) for c in counts.values()) for status in TaskStatus.values
    }
    return {
        "schedulers": [(s, counts.get(s.id, {})) for s in schedulers],
        "depth_chart": charts.stacked_bars(rows, QUEUE_KEYS, title="Queue depth per scheduler"),
        "totals": totals,
    }


def _throughput() -> dict[str, Any]:
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    hours = [now - timedelta(hours=h) for h in range(23, -1, -1)]
    per_hour = {status: [0] * len(hours) for status in OUTCOMES}
    index = {hour: i for i, hour in enumerate(hours)}
    for row in selectors.hourly_stats(hours=24):
        if row["status"] in per_hour and row["hour"] in index:
            per_hour[row["status"]][index[row["hour"]]] += row["count"]
    failed = selectors.hourly_failed_attempts(hours=24)
    series = {
        TaskStatus.COMPLETED: per_hour[TaskStatus.COMPLETED],
        FAILED_ATTEMPTS: [failed.get(hour, 0) for hour in hours],
        TaskStatus.FAILED: per_hour[TaskStatus.FAILED],
        TaskStatus.DEAD: per_hour[TaskStatus.DEAD],
    }
    labels = [f"{hour:%H}h" for hour in hours]
    return {
        "throughput_chart": charts.hourly_columns(
            labels,
            series,
            title="Completed, failed attempts (retried or final), failed and dead per hour "
            "(UTC), last 24 h",
        ),
        "throughput_total": {name: sum(values) for name, values in series.items()},
    }


def _workers() -> dict[str, Any]:
    now = timezone.now()
    rows = [(w, selectors.worker_state(w, now=now)) for w in selectors.worker_list()]
    return {"workers": rows, "live_workers": sum(state == "live" for _, state in rows)}


def _schedules() -> dict[str, Any]:
    now = timezone.now()
    due = Schedule.objects.filter(status=ScheduleStatus.ACTIVE, deadline_at__lte=now)
    overdue = due.filter(deadline_at__lt=now - timedelta(minutes=1))
    return {
        "due_count": due.count(),
        "overdue_count": overdue.count(),
        "most_overdue": list(overdue.select_related("scheduler").order_by("deadline_at")[:10]),
    }


def _pilots() -> dict[str, Any]:
    counts = pilot_counts()
    rows = sorted(counts["by_ce"].items())
    return {
        "pilot_totals": counts["by_status"],
        "pilots_chart": charts.stacked_bars(
            rows, PilotStatus.values, title="Pilots per CE by status"
        ),
        "reports": list(PilotReport.objects.order_by("-created_at")[:5]),
    }


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    context: dict[str, Any] = {
        "refresh_seconds": REFRESH_SECONDS,
        "now": timezone.now(),
        "dead_letters": list(
            Task.objects.filter(status=TaskStatus.DEAD).order_by("-modified_at")[:10]
        ),
        "health": system_health(),
        **_workers(),
        **_queues(),
        **_throughput(),
        **_schedules(),
        **_pilots(),
    }
    return render(request, "dashboard.html", context)
