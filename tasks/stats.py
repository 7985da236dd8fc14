"""The per-minute rollup of queue work (QueueMinute), run by beat every minute: started,
completed, failed attempts, FAILED, DEAD and the queue-wait histogram per queue and minute,
from the event history of minutes that have ended. The charts read only these rows.

Queue wait is from when a task was due (`not_before`) to when it was handed to its holder:
a worker's claim (DISPATCHED -> RUNNING) on a celery queue, a pop (QUEUED -> DISPATCHED) on
a pull queue. It is exact for an attempt whose task has not been queued again since; an
earlier attempt of a task retried (or handed back) before its minute was rolled up is left
out of the histogram (its `not_before` has moved on), and counted in `started` all the same.
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Case, CharField, Count, Exists, Max, OuterRef, Q, Value, When
from django.db.models.functions import TruncMinute
from django.utils import timezone

from tasks.models import (
    WAIT_BUCKETS,
    WAIT_COLUMNS,
    QueueMinute,
    SchedulerKind,
    TaskEvent,
    TaskStatus,
)
from tasks.selectors import failed_attempts_q

logger = logging.getLogger(__name__)

# Events commit a moment after their `at`: a minute is rolled up once this much past its end,
# and the last minutes are rolled up again on the next run.
SETTLE = timedelta(seconds=10)
REDO_MINUTES = 2
KEEP = timedelta(days=8)
COUNTED = ("started", "completed", "failed_attempts", "failed", "dead")


def epoch_minute(moment: datetime) -> int:
    return int(moment.timestamp() // 60)


def minute_start(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, tz=UTC)


def started_q() -> Q:
    """The hand-out of an attempt to its holder (see the module's docstring)."""
    claimed = Q(task__scheduler__kind=SchedulerKind.CELERY, to_status=TaskStatus.RUNNING)
    popped = Q(task__scheduler__kind=SchedulerKind.PULL, to_status=TaskStatus.DISPATCHED)
    return (claimed & Q(from_status=TaskStatus.DISPATCHED)) | (
        popped & Q(from_status=TaskStatus.QUEUED)
    )


def _category() -> Case:
    return Case(
        When(failed_attempts_q(), then=Value("failed_attempts")),
        When(started_q(), then=Value("started")),
        When(to_status=TaskStatus.COMPLETED, then=Value("completed")),
        default=Value(""),
        output_field=CharField(),
    )


def _counts(start: datetime, end: datetime) -> dict[tuple[str, int], dict[str, Any]]:
    rows: dict[tuple[str, int], dict[str, Any]] = defaultdict(
        lambda: dict.fromkeys(COUNTED, 0) | dict.fromkeys(WAIT_COLUMNS, 0) | {"wait_sum": 0.0}
    )
    events = TaskEvent.objects.filter(at__gte=start, at__lt=end)
    grouped = (
        events.annotate(m=TruncMinute("at"), category=_category())
        .exclude(category="")
        .values("task__scheduler_id", "m", "category", "to_status")
        .annotate(n=Count("id"))
    )
    for row in grouped:
        counts = rows[(row["task__scheduler_id"], epoch_minute(row["m"]))]
        counts[row["category"]] += row["n"]
        if row["category"] == "failed_attempts" and row["to_status"] != TaskStatus.QUEUED:
            counts[row["to_status"].lower()] += row["n"]  # failed / dead: final
    # A start whose task was queued again since (a retry, a hand-back, a requeue) has lost
    # the not_before it waited for: left out of the histogram.
    requeued = TaskEvent.objects.filter(
        task_id=OuterRef("task_id"), to_status=TaskStatus.QUEUED, id__gt=OuterRef("id")
    )
    waits = (
        events.filter(started_q())
        .exclude(Exists(requeued))
        .values_list("task__scheduler_id", "at", "task__not_before")
    )
    for scheduler_id, at, not_before in waits.iterator(chunk_size=5000):
        waited = (at - not_before).total_seconds()
        if waited >= 0:
            counts = rows[(scheduler_id, epoch_minute(at))]
            counts[WAIT_COLUMNS[bisect.bisect_left(WAIT_BUCKETS, waited)]] += 1
            counts["wait_sum"] += waited
    return rows


def queue_stats_rollup(*, now: datetime | None = None, backfill: timedelta | None = None) -> int:
    """Roll up the minutes that ended since the last run (the last REDO_MINUTES again), at
    most `backfill` (default: an hour) back; prune rows older than KEEP. Returns the rows
    written."""
    now = now or timezone.now()
    end = epoch_minute(now - SETTLE)
    last = QueueMinute.objects.aggregate(last=Max("minute"))["last"]
    oldest = end - int((backfill or timedelta(hours=1)).total_seconds() // 60)
    start = oldest if last is None or backfill else max(last - REDO_MINUTES + 1, oldest)
    rows = _counts(minute_start(start), minute_start(end))
    with transaction.atomic():
        QueueMinute.objects.filter(minute__gte=start, minute__lt=end).delete()
        QueueMinute.objects.bulk_create(
            QueueMinute(scheduler_id=scheduler_id, minute=minute, **values)
            for (scheduler_id, minute), values in rows.items()
        )
        QueueMinute.objects.filter(minute__lt=epoch_minute(now - KEEP)).delete()
    logger.debug("rolled up minutes %s..%s: %s rows", start, end, len(rows))
    return len(rows)
