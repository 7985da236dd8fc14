"""Reads that grow beyond one ORM call: counts per status, per-hour statistics, and the
queues a runner account is limited to."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group, Permission
from django.contrib.postgres.expressions import ArraySubquery
from django.db import connection
from django.db.models import (
    CharField,
    Count,
    Exists,
    F,
    Max,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Sum,
    Value,
)
from django.db.models.functions import Concat, TruncHour
from django.utils import timezone
from knox.models import AuthToken

from scheduler_site.databases import prepared_cursor, read_as_health_check, replanned_once
from tasks.exceptions import TaskNotFound
from tasks.models import (
    LEASED_STATUSES,
    WAIT_BUCKETS,
    WAIT_COLUMNS,
    QueueMinute,
    RunnerGrant,
    Scheduler,
    Task,
    TaskEvent,
    TaskStatus,
    Worker,
    WorkerKind,
)
from tasks.roles import OPERATORS

User = get_user_model()

# The queues an account may use: None means every queue.
QueueScope = frozenset[str] | None


def get_task(task_id: uuid.UUID) -> Task:
    """The task with its scheduler; TaskNotFound (404) if there is none."""
    try:
        return Task.objects.select_related("scheduler").get(id=task_id)
    except Task.DoesNotExist:
        raise TaskNotFound(f"Task {task_id} does not exist.") from None


def runner_queues(user: AbstractBaseUser | AnonymousUser | None) -> QueueScope:
    """The queues a runner account is limited to (DESIGN 9.1), or None for every queue: an
    account without grants, and any operator, whatever grants it holds. A user loaded by
    `token_candidates` carries its grants already (no query)."""
    if user is None or not user.is_authenticated:
        return None
    loaded = getattr(user, "_scope_loaded", None)
    if loaded is not None:
        granted, operator = frozenset(loaded[0]), loaded[1]
        return None if not granted or user.is_superuser or operator else granted
    granted = frozenset(
        RunnerGrant.objects.filter(user_id=user.pk).values_list("scheduler_id", flat=True)
    )
    if not granted or user.is_superuser or user.groups.filter(name=OPERATORS).exists():
        return None
    return granted


def _permission_names(permissions: QuerySet[Permission]) -> ArraySubquery:
    names = permissions.order_by().annotate(
        perm_name=Concat(
            "content_type__app_label", Value("."), "codename", output_field=CharField()
        )
    )
    return ArraySubquery(names.values("perm_name"))


_TOKEN_EXTRAS = ("user_perm_names", "group_perm_names", "granted_queues", "in_operators")
_KEY_SENTINEL = "token-key-placeholder"
_token_statement: tuple[str, list[Any], int] | None = None


def _token_queryset(token_key: str) -> QuerySet[AuthToken]:
    user = OuterRef("user_id")
    return (
        AuthToken.objects.filter(token_key=token_key)
        .select_related("user")
        .annotate(
            user_perm_names=_permission_names(Permission.objects.filter(user=user)),
            group_perm_names=_permission_names(Permission.objects.filter(group__user=user)),
            granted_queues=ArraySubquery(
                RunnerGrant.objects.filter(user_id=user).values("scheduler_id")
            ),
            in_operators=Exists(Group.objects.filter(name=OPERATORS, user=user)),
        )
    )


def _token_sql() -> tuple[str, list[Any], int]:
    """The statement, compiled once: building it through the ORM took longer than running
    it (the four subqueries), on every request."""
    global _token_statement
    if _token_statement is None:
        sql, params = _token_queryset(_KEY_SENTINEL).query.sql_with_params()
        _token_statement = (sql, list(params), list(params).index(_KEY_SENTINEL))
    return _token_statement


def token_candidates(token_key: str) -> list[AuthToken]:
    """The knox tokens with this key prefix, each with its user and, on PostgreSQL, what the
    request's permission checks need (the user's and its groups' permissions, its queue grants,
    whether it is an operator) in the same statement: one round trip authenticates and
    authorises a request. Read fresh on every request, so a revoked permission, grant or token
    counts at once (no cache to go stale)."""
    if connection.vendor != "postgresql":
        return list(AuthToken.objects.filter(token_key=token_key).select_related("user"))
    sql, params, at = _token_sql()
    params = [*params]
    params[at] = token_key

    def read() -> list[Any]:
        with prepared_cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    # The request's first statement: it stands in for Django's `SELECT 1` health check.
    rows = read_as_health_check(lambda: replanned_once(connection, read))
    return [_token_from_row(row) for row in rows]


def _token_from_row(row: Sequence[Any]) -> AuthToken:
    # Column order of the compiled statement: the token's fields, the annotations, then the
    # select_related user's fields (no converters apply to these columns on PostgreSQL).
    token_fields = [f.attname for f in AuthToken._meta.concrete_fields]
    user_fields = [f.attname for f in User._meta.concrete_fields]
    split = len(token_fields) + len(_TOKEN_EXTRAS)
    token = AuthToken.from_db(connection.alias, token_fields, row[: len(token_fields)])
    for name, value in zip(_TOKEN_EXTRAS, row[len(token_fields) : split], strict=True):
        setattr(token, name, value)
    token.user = User.from_db(connection.alias, user_fields, row[split:])
    return token


def prime_user(token: AuthToken) -> None:
    """Hand what `token_candidates` read to the permission checks: Django's ModelBackend reads
    its per-user caches (`_user_perm_cache`, …) before querying, and `runner_queues` reads
    `_scope_loaded`. A superuser's permissions are all there are: ModelBackend's own path."""
    if not hasattr(token, "user_perm_names"):
        return
    user = token.user
    user._scope_loaded = (token.granted_queues, token.in_operators)
    if user.is_superuser:
        return
    user._user_perm_cache = set(token.user_perm_names)
    user._group_perm_cache = set(token.group_perm_names)
    user._perm_cache = user._user_perm_cache | user._group_perm_cache


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


def recent_failures(*, scheduler_id: str, limit: int = 20) -> list[TaskEvent]:
    """A queue's latest failed attempts of the last 24 hours (event, with its task)."""
    since = timezone.now() - timedelta(hours=24)
    events = TaskEvent.objects.filter(failed_attempts_q(), at__gte=since)
    events = events.filter(task__scheduler_id=scheduler_id).select_related("task")
    return list(events.order_by("-at", "-id")[:limit])


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


# --- charts: series over a range, from the per-minute rollup (tasks.stats) --------------------

# range -> (length in minutes, minutes per point): 60 points, 96 points, 168 points.
RANGES = {"1h": (60, 1), "24h": (24 * 60, 15), "7d": (7 * 24 * 60, 60)}
SERIES_COUNTS = ("started", "completed", "failed_attempts", "failed", "dead")


def queue_series(
    *, range_name: str, scheduler_id: str | None = None, queues: QueueScope = None
) -> dict[str, Any]:
    """Throughput (per point: started, completed, failed attempts, FAILED, DEAD) and queue
    wait p50/p95 (seconds, None where nothing started) over `range_name`, for one queue or all
    (a limited runner's: its own). One indexed range of the rollup, summed in SQL."""
    length, step = RANGES[range_name]
    # Points of `step` minutes, aligned to the step, the last one the current (partial) one.
    end = (int(timezone.now().timestamp() // 60) // step + 1) * step
    start = end - length
    rows = QueueMinute.objects.filter(minute__gte=start, minute__lt=end)
    if scheduler_id:
        rows = rows.filter(scheduler_id=scheduler_id)
    if queues is not None:
        rows = rows.filter(scheduler_id__in=queues)
    sums = {name: Sum(name) for name in (*SERIES_COUNTS, *WAIT_COLUMNS)}
    grouped = rows.annotate(point=F("minute") / step).values("point").annotate(**sums)
    points = list(range(start // step, end // step))
    by_point = {row["point"]: row for row in grouped.order_by("point")}
    series: dict[str, Any] = {
        "range": range_name,
        "step_seconds": step * 60,
        "t": [point * step * 60 for point in points],
    }
    for name in SERIES_COUNTS:
        series[name] = [(by_point.get(p) or {}).get(name) or 0 for p in points]
    for label, q in (("wait_p50", 0.5), ("wait_p95", 0.95)):
        series[label] = [_quantile(by_point.get(p), q) for p in points]
    return series


def _quantile(row: dict[str, Any] | None, q: float) -> float | None:
    """The q-quantile of a summed histogram, interpolated within its bucket (as Prometheus'
    histogram_quantile); None for no observation."""
    counts = [(row or {}).get(name) or 0 for name in WAIT_COLUMNS]
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            low = WAIT_BUCKETS[index - 1] if index else 0.0
            high = WAIT_BUCKETS[index] if index < len(WAIT_BUCKETS) else WAIT_BUCKETS[-1]
            return round(low + (high - low) * (rank - seen) / count, 3)
        seen += count
    return float(WAIT_BUCKETS[-1])
