"""The operator's pages: the dashboard at `/` (health, workers, queues, throughput and queue
wait over a chosen range, dead letters, due schedules, pilots) and a page per queue at
`/queues/<id>/`. Each panel is a fragment of its own (`?panel=NAME`) that the page's script
fetches again every REFRESH_SECONDS, and the charts read GET /api/tasks/series/: the page
refreshes itself without reloading."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from pilots.models import PilotReport, PilotStatus
from pilots.services import pilot_counts
from scheduler_site import charts
from scheduler_site.health import celery_queue_of, system_health
from schedules.models import Schedule, ScheduleStatus
from tasks import selectors
from tasks.models import Scheduler, SchedulerKind, Task, TaskStatus, WorkerKind

REFRESH_SECONDS = 15
QUEUE_KEYS = [TaskStatus.QUEUED, TaskStatus.DISPATCHED, TaskStatus.RUNNING]
RANGES = list(selectors.RANGES)


def _health() -> dict[str, Any]:
    return {"health": system_health()}


def _workers(scheduler: Scheduler | None = None) -> dict[str, Any]:
    now = timezone.now()
    rows = [(w, selectors.worker_state(w, now=now)) for w in selectors.worker_list()]
    if scheduler is not None:
        rows = [(w, state) for w, state in rows if _serves(w, scheduler)]
    return {"workers": rows, "live_workers": sum(state == "live" for _, state in rows)}


def _serves(worker: Any, scheduler: Scheduler) -> bool:
    if scheduler.kind == SchedulerKind.CELERY:
        return worker.kind == WorkerKind.CELERY and celery_queue_of(scheduler) in worker.queues
    return worker.kind == WorkerKind.RUNNER and scheduler.id in worker.queues


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


def _dead_letters() -> dict[str, Any]:
    dead = Task.objects.filter(status=TaskStatus.DEAD)
    return {
        "dead_count": dead.count(),
        "dead_letters": list(dead.order_by("-modified_at")[:10]),
    }


def _schedules() -> dict[str, Any]:
    now = timezone.now()
    due = Schedule.objects.filter(status=ScheduleStatus.ACTIVE, deadline_at__lte=now)
    overdue = due.filter(deadline_at__lt=now - timedelta(minutes=1))
    # Paused by the failure policy (max_consecutive_failures): they need an operator's look.
    failing = Schedule.objects.filter(status=ScheduleStatus.PAUSED, consecutive_failures__gt=0)
    failing = failing.exclude(paused_reason="")
    return {
        "due_count": due.count(),
        "overdue_count": overdue.count(),
        "most_overdue": list(overdue.select_related("scheduler").order_by("deadline_at")[:10]),
        "failing_count": failing.count(),
        "paused_by_failures": list(
            failing.select_related("scheduler").order_by("-modified_at")[:10]
        ),
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


PANELS = {
    "health": _health,
    "workers": _workers,
    "queues": _queues,
    "dead-letters": _dead_letters,
    "schedules": _schedules,
    "pilots": _pilots,
}


Panels = dict[str, Callable[[], dict[str, Any]]]


def _page(request: HttpRequest, template: str, panels: Panels, **context: Any) -> HttpResponse:
    context |= {"refresh_seconds": REFRESH_SECONDS, "now": timezone.now(), "ranges": RANGES}
    name = request.GET.get("panel")
    if name is not None:
        if name not in panels:
            raise Http404(f"No panel {name!r}.")
        return render(request, f"dashboard/{name}.html", context | panels[name]())
    for build in panels.values():
        context |= build()
    return render(request, template, context)


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    return _page(request, "dashboard.html", PANELS)


def _queue_summary(scheduler: Scheduler) -> dict[str, Any]:
    counts = selectors.status_counts([scheduler.id]).get(scheduler.id, {})
    hour = selectors.queue_series(range_name="1h", scheduler_id=scheduler.id)
    return {
        "counts": counts,
        "depth_chart": charts.stacked_bars(
            [(scheduler.id, counts)], QUEUE_KEYS, title=f"Depth of {scheduler.id}"
        ),
        "last_hour": {n.replace("_", " "): sum(hour[n]) for n in selectors.SERIES_COUNTS},
        "recent_failures": selectors.recent_failures(scheduler_id=scheduler.id),
    }


@login_required
def queue_page(request: HttpRequest, scheduler_id: str) -> HttpResponse:
    """One queue: depth, rates and wait over a range, the workers serving it, its recent
    failures."""
    scheduler = get_object_or_404(Scheduler, id=scheduler_id)
    panels = {
        "queue-summary": lambda: _queue_summary(scheduler),
        "workers": lambda: _workers(scheduler),
    }
    return _page(request, "queue.html", panels, scheduler=scheduler)
