"""Health. `/healthz` is the cheap liveness probe (database and broker reachable, for a load
balancer). `GET /api/health/` (authenticated) says whether the system does its work: each
component ok, degraded or down with a reason (DESIGN 9.6):

- database and broker reachable;
- Celery workers: at least one live (the system's own periodic jobs run on them);
- beat: it sent a periodic job within 3 intervals of its most frequent one (at least 10 s);
- each unpaused celery queue with work (tasks due or leased) has a live worker consuming its
  Celery queue (else down); each unpaused pull queue with tasks due has a runner seen lately
  (else degraded: runners may be started on demand, e.g. as pilots).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from cronsim import CronSim
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from django_celery_beat.models import PeriodicTask
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view, permission_classes
from rest_framework.request import Request
from rest_framework.response import Response

from scheduler_site import health_sql
from scheduler_site.api_input import refuse_unknown
from scheduler_site.celery import app as celery_app
from scheduler_site.permissions import Authenticated
from tasks import selectors
from tasks.models import Scheduler, SchedulerKind, Worker, WorkerKind

logger = logging.getLogger(__name__)

OK, DEGRADED, DOWN = "ok", "degraded", "down"
SEVERITY = {OK: 0, DEGRADED: 1, DOWN: 2}
BEAT_MIN_SILENCE = timedelta(seconds=10)


@dataclass(frozen=True)
class Component:
    name: str
    status: str
    reason: str


@dataclass
class HealthReport:
    checked_at: datetime
    components: list[Component] = field(default_factory=list)

    @property
    def status(self) -> str:
        worst = max((SEVERITY[c.status] for c in self.components), default=0)
        return next(name for name, level in SEVERITY.items() if level == worst)

    @property
    def problems(self) -> list[Component]:
        return [c for c in self.components if c.status != OK]

    def as_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "checked_at": self.checked_at.isoformat(),
            "components": [asdict(c) for c in self.components],
        }


def _database_ok() -> bool:
    try:
        return health_sql.database_answers()
    except Exception:
        logger.exception("health: database unreachable")
        return False


def _broker_ok() -> bool:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        logger.exception("health: broker unreachable")
        return False


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    checks = {"database": _database_ok(), "broker": _broker_ok()}
    healthy = all(checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", "checks": checks},
        status=200 if healthy else 503,
    )


# --- the full report -------------------------------------------------------------------------


def celery_queue_of(scheduler: Scheduler) -> str:
    """The Celery queue a celery-kind scheduler's tasks are sent to: its own `celery_queue`
    where the model has one (DESIGN 9.7), else Celery's default queue."""
    return getattr(scheduler, "celery_queue", "") or celery_app.conf.task_default_queue


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    return f"{max(0, round((now - moment).total_seconds()))} s ago"


def _beat_interval(now: datetime) -> timedelta | None:
    """The interval of beat's most frequent enabled periodic job (None: no job enabled)."""
    shortest: timedelta | None = None
    jobs = PeriodicTask.objects.filter(enabled=True).select_related("interval", "crontab")
    for job in jobs:
        every = None
        if job.interval is not None:
            every = job.interval.schedule.run_every
        elif job.crontab is not None:
            every = _cron_gap(job.crontab, now)
        if every is not None and (shortest is None or every < shortest):
            shortest = every
    return shortest


def _cron_gap(crontab: object, now: datetime) -> timedelta | None:
    fields = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
    expression = " ".join(str(getattr(crontab, name)) for name in fields)
    try:
        runs = CronSim(expression, now)
        first = next(runs)
        return next(runs) - first
    except Exception:  # a beat expression cronsim does not read: judge by the others
        return None


def _beat(now: datetime, workers: list[Worker]) -> Component:
    interval = _beat_interval(now)
    if interval is None:
        reason = "no periodic job is enabled: run manage.py setup_periodic_tasks"
        return Component("beat", DEGRADED, reason)
    last = max((w.last_seen_at for w in workers if w.kind == WorkerKind.BEAT), default=None)
    allowed = max(3 * interval, BEAT_MIN_SILENCE)
    seconds = round(interval.total_seconds())
    if last is None or now - last > allowed:
        reason = f"beat last sent a periodic job {_ago(last, now)}; expected every {seconds} s"
        return Component("beat", DOWN, reason)
    return Component("beat", OK, f"last sent a periodic job {_ago(last, now)}")


def _celery_workers(now: datetime, live: list[Worker], workers: list[Worker]) -> Component:
    nodes = [w for w in live if w.kind == WorkerKind.CELERY]
    if nodes:
        names = ", ".join(w.name for w in nodes[:5]) + (" …" if len(nodes) > 5 else "")
        return Component("celery workers", OK, f"{len(nodes)} live: {names}")
    seen = [w.last_seen_at for w in workers if w.kind == WorkerKind.CELERY]
    reason = (
        f"no live Celery worker (last seen {_ago(max(seen, default=None), now)}): the "
        "orchestrator, the dispatcher and every celery queue are stopped"
    )
    return Component("celery workers", DOWN, reason)


def _queues(live: list[Worker], now: datetime) -> list[Component]:
    work = selectors.active_work(now=now)
    consumers: dict[str, int] = {}
    runners: dict[str, int] = {}
    for worker in live:
        into = consumers if worker.kind == WorkerKind.CELERY else runners
        if worker.kind != WorkerKind.BEAT:
            for name in worker.queues:
                into[name] = into.get(name, 0) + 1
    components = []
    for scheduler in Scheduler.objects.filter(id__in=list(work), paused=False).order_by("id"):
        due, leased = work[scheduler.id]
        if scheduler.kind == SchedulerKind.CELERY:
            components.append(_celery_queue(scheduler, due, leased, consumers))
        elif due:
            components.append(_pull_queue(scheduler, due, runners))
    return components


def _celery_queue(
    scheduler: Scheduler, due: int, leased: int, consumers: dict[str, int]
) -> Component:
    queue = celery_queue_of(scheduler)
    name = f"queue {scheduler.id}"
    count = consumers.get(queue, 0)
    if not count:
        reason = (
            f"{due} tasks due and {leased} leased, and no live worker consumes Celery "
            f"queue {queue!r}"
        )
        return Component(name, DOWN, reason)
    return Component(name, OK, f"{count} live workers on Celery queue {queue!r}")


def _pull_queue(scheduler: Scheduler, due: int, runners: dict[str, int]) -> Component:
    name = f"queue {scheduler.id}"
    count = runners.get(scheduler.id, 0)
    if not count:
        reason = f"{due} tasks due and no runner has popped from it lately"
        return Component(name, DEGRADED, reason)
    return Component(name, OK, f"{count} runners seen lately")


def system_health() -> HealthReport:
    now = timezone.now()
    report = HealthReport(checked_at=now)
    if not _database_ok():
        report.components.append(Component("database", DOWN, "the database is unreachable"))
        return report
    report.components.append(Component("database", OK, "reachable"))
    broker = (OK, "reachable") if _broker_ok() else (DOWN, "the broker is unreachable")
    report.components.append(Component("broker", *broker))
    workers = list(Worker.objects.all())
    live = [w for w in workers if selectors.worker_is_live(w, now=now)]
    report.components.append(_celery_workers(now, live, workers))
    report.components.append(_beat(now, workers))
    report.components.extend(_queues(live, now))
    return report


HEALTH_RESPONSE = inline_serializer(
    "Health",
    {
        "status": serializers.ChoiceField(choices=[OK, DEGRADED, DOWN]),
        "checked_at": serializers.DateTimeField(),
        "components": inline_serializer(
            "HealthComponent",
            {
                "name": serializers.CharField(),
                "status": serializers.ChoiceField(choices=[OK, DEGRADED, DOWN]),
                "reason": serializers.CharField(),
            },
            many=True,
        ),
    },
)


@extend_schema(
    tags=["health"],
    responses={200: HEALTH_RESPONSE},
    description="Each component ok, degraded or down with a reason, and the worst of them as "
    "`status`. Always 200 when it could answer (read `status`); `/healthz` is the probe for "
    "load balancers.",
)
@api_view(["GET"])
@permission_classes([Authenticated])
def health_view(request: Request) -> Response:
    refuse_unknown(request.query_params, ())
    report = system_health()
    return Response(report.as_dict())
