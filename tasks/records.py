"""The tasks app's operational records beside the queue: flow control's state and window log,
lock leases, runner grants, registered workers and the per-minute queue rollup. Their models
are re-exported by tasks.models (Django finds them there); they refer to Scheduler by name so
this module stays below it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class FlowState(models.Model):
    """A flow-controlled scheduler's hand-out state. Its row is the lock every hand-out of
    that scheduler (pop or dispatch) takes first, so the counts it then reads are exact."""

    scheduler = models.OneToOneField(
        "tasks.Scheduler", on_delete=models.CASCADE, primary_key=True, related_name="flow_state"
    )
    fair_cursor = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    redispatch_at_us = models.BigIntegerField(
        null=True, blank=True, help_text="A delayed dispatch is due then (rate-limited queues)."
    )
    # Tasks handed out so far (rate-limited queues): with FlowHandout.total it gives the
    # window's count from two rows, whatever the number of batches in the window.
    handed_out = models.BigIntegerField(default=0, db_default=0)

    def __str__(self) -> str:
        return f"flow state of {self.scheduler_id}"


class FlowHandout(models.Model):
    """One hand-out batch of a rate-limited scheduler, kept for one rate window: the
    sliding window's log (at: microseconds since the epoch)."""

    # No foreign key constraint in the database: its check on every hand-out's insert locked
    # the scheduler row (FOR KEY SHARE, a WAL record) and ran a query of its own. The rows
    # go with their scheduler all the same: Django's delete cascades to them.
    scheduler = models.ForeignKey(
        "tasks.Scheduler", on_delete=models.CASCADE, db_index=False, db_constraint=False
    )
    at_us = models.BigIntegerField()
    count = models.PositiveIntegerField()
    # FlowState.handed_out after this batch: the window's count is the queue's total minus
    # (total - count) of the window's oldest row, two index reads instead of a sum.
    total = models.BigIntegerField(default=0, db_default=0)

    class Meta:
        # With `total`: the window's oldest batch is the first entry after its start, read
        # in order (ties of at_us in hand-out order) instead of sorting the window's rows.
        indexes = [models.Index(fields=["scheduler", "at_us", "total"], name="flow_handout_idx")]

    def __str__(self) -> str:
        return f"{self.scheduler_id}: {self.count} at {self.at_us}"


class Lock(models.Model):
    """A lease-based mutex (DiracX's MutexLock): held by `owner` until `expires_at`; an expired
    lock can be taken over. Rows are created on acquire and deleted on release."""

    name = models.CharField(max_length=255, primary_key=True)
    owner = models.CharField(max_length=200)
    acquired_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["expires_at"], name="lock_expires_idx")]

    def __str__(self) -> str:
        return f"{self.name} held by {self.owner} until {self.expires_at:%H:%M:%S}"


class RunnerGrant(models.Model):
    """One queue a runner account is limited to (DESIGN 9.1). An account with no grant reaches
    every queue; one with grants sees, pops and reports only those. Operators are never
    limited. Written by `manage.py create_api_user --scheduler`.

    No foreign-key constraint to the scheduler and no cascade: deleting a queue must not
    delete its grants, or a runner limited to that one queue would then reach every queue."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="runner_grants"
    )
    scheduler = models.ForeignKey(
        "tasks.Scheduler",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "scheduler"], name="runner_grant_unique")
        ]

    def __str__(self) -> str:
        return f"{self.user_id} may use {self.scheduler_id}"


class WorkerKind(models.TextChoices):
    CELERY = "celery", "Celery worker"
    RUNNER = "runner", "pull runner"
    BEAT = "beat", "Celery beat"


class Worker(models.Model):
    """A process that does the queue's work, as it last reported itself (DESIGN 9.6): a Celery
    worker node (its timer beats every WORKER_HEARTBEAT_SECONDS), a pull runner (seen when its
    calls reach the API) or beat (seen when it sends a periodic job). Live when seen lately and
    not stopped; rows long unseen are forgotten."""

    kind = models.CharField(max_length=16, choices=WorkerKind.choices)
    name = models.CharField(max_length=200, help_text="Celery's node name, or the runner's.")
    host = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    # Celery workers: the Celery queues they consume; runners: the schedulers they pop from.
    queues = models.JSONField(default=list, blank=True)
    account = models.CharField(max_length=150, blank=True, help_text="A runner's API account.")
    started_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    stopped_at = models.DateTimeField(null=True, blank=True, help_text="Shut down cleanly.")
    tasks_held = models.PositiveIntegerField(
        default=0, help_text="Leased tasks it held when last seen."
    )

    class Meta:
        ordering = ["kind", "name"]
        constraints = [models.UniqueConstraint(fields=["kind", "name"], name="worker_kind_name")]
        indexes = [models.Index(fields=["kind", "last_seen_at"], name="worker_seen_idx")]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


# Upper bounds (seconds) of the queue-wait histogram buckets of QueueMinute; one more bucket
# holds everything above the last.
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class QueueMinute(models.Model):
    """One queue's work in one minute, rolled up from the event history by a periodic job,
    so that charts over a day or a week read at most a row per queue and minute instead of
    every event. Queue wait (due -> handed to its holder) is a histogram: percentiles of any
    range are read from the summed buckets."""

    scheduler_id = models.CharField(max_length=64)
    minute = models.BigIntegerField(help_text="Minutes since the Unix epoch (UTC).")
    started = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed_attempts = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    dead = models.PositiveIntegerField(default=0)
    wait_sum = models.FloatField(default=0.0)
    # wait_0 .. wait_13 (added below): counts per WAIT_BUCKETS bucket, the last one above
    # 3600 s. Columns, not a JSON list, so that a range's buckets are summed in SQL.

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["scheduler_id", "minute"], name="queue_minute_uniq")
        ]
        indexes = [models.Index(fields=["minute"], name="queue_minute_idx")]

    def __str__(self) -> str:
        return f"{self.scheduler_id} @ {self.minute}"


WAIT_COLUMNS = [f"wait_{index}" for index in range(len(WAIT_BUCKETS) + 1)]
for _column in WAIT_COLUMNS:
    QueueMinute.add_to_class(_column, models.PositiveIntegerField(default=0))
