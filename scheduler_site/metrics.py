"""Prometheus metrics at /metrics.

Gauges are read from the database at scrape time (so every process reports the same truth);
latency histograms are recorded in the process that does the work. With several processes
(gunicorn workers, Celery workers) set PROMETHEUS_MULTIPROC_DIR so the histograms are
aggregated across them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from django.db.models import Count, QuerySet
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from rest_framework.authentication import SessionAuthentication
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.request import Request

from pilots.models import PilotSubmission
from scheduler_site.health import SEVERITY, system_health
from scheduler_site.permissions import Authenticated, TokenAuthentication
from schedules.models import Schedule, ScheduleStatus
from tasks import selectors
from tasks.metrics import DISPATCH_SECONDS, POP_SECONDS, QUEUE_WAIT_SECONDS, TRANSITION_SECONDS
from tasks.models import Task, TaskStatus


def _counts(name: str, doc: str, queryset: QuerySet, labels: dict[str, str]) -> GaugeMetricFamily:
    """A gauge of `queryset`'s rows counted per value of `labels` (label -> field), in one
    grouped query."""
    gauge = GaugeMetricFamily(name, doc, labels=list(labels))
    rows = queryset.order_by().values_list(*labels.values()).annotate(n=Count("id"))
    for *values, n in rows:
        gauge.add_metric(values, n)
    return gauge


class DatabaseCollector(Collector):
    """Queue depth, tasks by status, due schedules and pilots by status, from the database."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = timezone.now()
        by_queue = {"scheduler": "scheduler_id"}
        yield _counts(
            "scheduler_tasks",
            "Tasks by scheduler and status.",
            Task.objects.all(),
            {**by_queue, "status": "status"},
        )
        yield _counts(
            "scheduler_queue_depth",
            "QUEUED tasks due now (not past their expires_at).",
            Task.objects.filter(status=TaskStatus.QUEUED, not_before__lte=now).exclude(
                expires_at__lte=now
            ),
            by_queue,
        )
        yield _counts(
            "scheduler_due_schedules",
            "ACTIVE schedules due now.",
            Schedule.objects.filter(status=ScheduleStatus.ACTIVE, deadline_at__lte=now),
            by_queue,
        )
        yield _counts(
            "scheduler_schedules_paused_by_failures",
            "Schedules paused after max_consecutive_failures failed runs in a row.",
            Schedule.objects.filter(
                status=ScheduleStatus.PAUSED, consecutive_failures__gt=0
            ).exclude(paused_reason=""),
            by_queue,
        )
        yield _counts(
            "scheduler_pilots",
            "Pilots by CE and status.",
            PilotSubmission.objects.all(),
            {"ce": "ce__name", "status": "status"},
        )


class HealthCollector(Collector):
    """GET /api/health/ as gauges: each component's status (0 ok, 1 degraded, 2 down; the
    component "overall" is the worst), and workers by kind and state."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = system_health()
        status = GaugeMetricFamily(
            "scheduler_health_status",
            "Health per component: 0 ok, 1 degraded, 2 down (as GET /api/health/).",
            labels=["component"],
        )
        status.add_metric(["overall"], SEVERITY[report.status])
        for component in report.components:
            status.add_metric([component.name], SEVERITY[component.status])
        workers = GaugeMetricFamily(
            "scheduler_workers", "Workers, runners and beat by state.", labels=["kind", "state"]
        )
        counts: dict[tuple[str, str], int] = {}
        for worker in selectors.worker_list():
            key = (worker.kind, selectors.worker_state(worker))
            counts[key] = counts.get(key, 0) + 1
        for (kind, state), n in sorted(counts.items()):
            workers.add_metric([kind, state], n)
        yield from (status, workers)


_database_collector = DatabaseCollector()
_health_collector = HealthCollector()


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        for collector in (POP_SECONDS, DISPATCH_SECONDS, TRANSITION_SECONDS, QUEUE_WAIT_SECONDS):
            registry.register(collector)
    registry.register(_database_collector)
    registry.register(_health_collector)
    return registry


@extend_schema(exclude=True)  # Prometheus text, not part of the JSON API
@api_view(["GET"])
@authentication_classes([TokenAuthentication, SessionAuthentication])
@permission_classes([Authenticated])
def metrics_view(request: Request) -> HttpResponse:
    """Prometheus text format. Authenticated like the API (Prometheus: `authorization:
    {type: Token, credentials: <key>}`)."""
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)
