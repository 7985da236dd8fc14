"""Schedulers (named queues), tasks (the queue *is* this table) and their event history."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

POLICIES = (
    "most_overdue_first",
    "never_run_first",
    "least_recently_run_first",
    "highest_priority_first",
)


def default_policy_weights() -> dict[str, int]:
    return {"most_overdue_first": 49, "never_run_first": 49, "least_recently_run_first": 2}


class SchedulerKind(models.TextChoices):
    PULL = "pull", "pull (external runners pop over REST)"
    CELERY = "celery", "celery (a registered handler runs on Celery workers)"


class RetryPolicy(models.TextChoices):
    NONE = "none", "no retry"
    FIXED = "fixed", "fixed delay"
    EXPONENTIAL = "exponential", "exponential backoff with cap and jitter"


class TaskStatus(models.TextChoices):
    QUEUED = "QUEUED"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"


ACTIVE_STATUSES = frozenset({TaskStatus.QUEUED, TaskStatus.DISPATCHED, TaskStatus.RUNNING})
LEASED_STATUSES = frozenset({TaskStatus.DISPATCHED, TaskStatus.RUNNING})
# What an operator may requeue: an attempt still leased or queued has a holder (or is about to
# get one), and requeueing it would hand the same work out twice.
REQUEUEABLE_STATUSES = frozenset({TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED})
FINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED}
)

# The one table of allowed transitions; services refuse anything else.
# DISPATCHED/RUNNING -> QUEUED is a retry after a failed or lost attempt, or a hand-back
# (runner shutting down, lock held). FAILED/DEAD/CANCELLED -> QUEUED is an operator's requeue.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.DISPATCHED, TaskStatus.CANCELLED}),
    TaskStatus.DISPATCHED: frozenset(
        {
            TaskStatus.RUNNING,
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.DEAD,
            TaskStatus.QUEUED,
            TaskStatus.CANCELLED,
        }
    ),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.DEAD,
            TaskStatus.QUEUED,
            TaskStatus.CANCELLED,
        }
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset({TaskStatus.QUEUED}),
    TaskStatus.DEAD: frozenset({TaskStatus.QUEUED}),
    TaskStatus.CANCELLED: frozenset({TaskStatus.QUEUED}),
}


def is_allowed_transition(from_status: str, to_status: str) -> bool:
    return to_status in ALLOWED_TRANSITIONS.get(from_status, frozenset())


# Celery's own default queue (task_default_queue): a worker started without -Q consumes it.
DEFAULT_CELERY_QUEUE = "celery"

celery_queue_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$",
    "Use 1-100 letters, digits, '-', '_', '.' or ':', starting with a letter or digit.",
)

scheduler_id_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9_-]{0,63}$",
    "Use 1-64 lower-case letters, digits, '-' or '_', starting with a letter or digit.",
)


class Scheduler(models.Model):
    id = models.CharField(primary_key=True, max_length=64, validators=[scheduler_id_validator])
    kind = models.CharField(max_length=16, choices=SchedulerKind.choices, default="pull")
    description = models.CharField(max_length=200, blank=True)
    handler = models.CharField(
        max_length=200, blank=True, help_text="Registered handler name (celery-kind schedulers)."
    )
    celery_queue = models.CharField(
        max_length=100,
        default=DEFAULT_CELERY_QUEUE,
        validators=[celery_queue_validator],
        help_text="Celery queue the dispatcher sends this scheduler's tasks to (celery-kind "
        "only); workers started with `-Q NAME` take only their queues.",
    )
    paused = models.BooleanField(default=False, help_text="A paused queue hands out nothing.")
    max_queue_size = models.PositiveIntegerField(
        default=0, help_text="Most QUEUED tasks; a push beyond it is refused. 0 = unlimited."
    )
    dispatch_threshold = models.PositiveIntegerField(
        default=10,
        validators=[MinValueValidator(1)],
        help_text="Celery queues: most tasks in the broker at once.",
    )
    lease_seconds = models.PositiveIntegerField(
        default=300,
        validators=[MinValueValidator(1), MaxValueValidator(86400)],
        help_text="How long a popped task is leased before the reaper takes it back.",
    )
    retry_policy = models.CharField(
        max_length=16, choices=RetryPolicy.choices, default=RetryPolicy.EXPONENTIAL
    )
    max_attempts = models.PositiveIntegerField(
        default=3,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="Attempts in all, the first one included.",
    )
    retry_delay_seconds = models.PositiveIntegerField(
        default=10, help_text="Fixed delay, or the base of the exponential backoff."
    )
    retry_max_delay_seconds = models.PositiveIntegerField(
        default=3600, help_text="Cap of the exponential backoff."
    )
    retry_jitter = models.BooleanField(
        default=True, help_text="Spread retries over [delay/2, delay] so failures do not align."
    )
    dead_letter = models.BooleanField(
        default=True, help_text="Exhausted tasks become DEAD (replayable) rather than FAILED."
    )
    policy_weights = models.JSONField(
        default=default_policy_weights,
        blank=True,
        help_text="Orchestrator: share of the free room per policy, e.g. "
        '{"most_overdue_first": 49, "never_run_first": 49, "least_recently_run_first": 2}.',
    )
    system = models.BooleanField(
        default=False, editable=False, help_text="Made by the system for itself: not deletable."
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    modified_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.id

    def clean(self) -> None:
        weights = self.policy_weights
        problem = None
        if not isinstance(weights, dict) or not weights:
            problem = "must be an object of policy name to weight."
        elif unknown := sorted(set(weights) - set(POLICIES)):
            problem = f"unknown policies {unknown}; known: {list(POLICIES)}."
        elif not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in weights.values()
        ):
            problem = "weights must be whole numbers ≥ 0."
        elif sum(weights.values()) == 0:
            problem = "at least one weight must be above 0."
        errors: dict[str, str] = {}
        if problem:
            errors["policy_weights"] = problem
        if self.kind == SchedulerKind.CELERY and not self.handler:
            errors["handler"] = "A celery scheduler needs a handler."
        elif self.handler:
            from tasks.registry import HANDLERS

            if self.handler not in HANDLERS:
                known = ", ".join(sorted(HANDLERS)) or "none"
                errors["handler"] = f"{self.handler!r} is not registered (known: {known})."
        if self.retry_max_delay_seconds < self.retry_delay_seconds:
            errors["retry_max_delay_seconds"] = "Must not be less than retry_delay_seconds."
        if errors:
            raise ValidationError(errors)


class Task(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    scheduler = models.ForeignKey(
        Scheduler, on_delete=models.CASCADE, related_name="tasks", db_index=False
    )
    schedule = models.ForeignKey(
        "schedules.Schedule",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="tasks",
        db_index=False,
    )
    status = models.CharField(max_length=16, choices=TaskStatus.choices, default=TaskStatus.QUEUED)
    priority = models.IntegerField(default=0, help_text="Lower runs first.")
    # NULL, not "", for "no hash": the partial unique index must ignore hash-less tasks.
    hash = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    data = models.JSONField(default=dict, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    not_before = models.DateTimeField(default=timezone.now)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="Who holds the lease.")
    # A fresh random secret per hand-out (pop or worker claim), cleared when the attempt ends.
    # Holders prove who they are with it: the attempt number is visible to anyone who can GET
    # the task, so it fences stale holders out but proves nothing.
    lease_token = models.CharField(max_length=64, blank=True, default="", editable=False)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    lock_waits = models.PositiveIntegerField(
        default=0, help_text="Times handed back because a lock was held (grows the delay)."
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    modified_at = models.DateTimeField(default=timezone.now)

    class Meta:
        permissions = [
            ("pop_task", "Can pop tasks from a queue"),
            ("report_task", "Can heartbeat tasks and report their status"),
        ]
        indexes = [
            # The queue: only QUEUED rows are in it, so pop stays flat however many
            # finished tasks the table holds.
            models.Index(
                fields=["scheduler", "priority", "created_at", "id"],
                condition=Q(status="QUEUED"),
                name="task_queue_idx",
            ),
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(status__in=["DISPATCHED", "RUNNING"]),
                name="task_lease_idx",
            ),
            # Counts per status, stats windows and pruning per (scheduler, status).
            models.Index(fields=["scheduler", "status", "modified_at"], name="task_status_idx"),
            models.Index(fields=["hash"], name="task_hash_idx"),
            models.Index(fields=["created_at", "id"], name="task_created_idx"),
            models.Index(fields=["schedule", "created_at"], name="task_schedule_idx"),
        ]
        constraints = [
            # Dedup is the database's job: check-then-insert loses under concurrency.
            models.UniqueConstraint(
                fields=["scheduler", "hash"],
                condition=Q(hash__isnull=False, status__in=["QUEUED", "DISPATCHED", "RUNNING"]),
                name="task_active_hash_uniq",
            ),
            # At most one active task per schedule: a due schedule whose task still runs waits.
            models.UniqueConstraint(
                fields=["schedule"],
                condition=Q(schedule__isnull=False, status__in=["QUEUED", "DISPATCHED", "RUNNING"]),
                name="task_active_schedule_uniq",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.scheduler_id}/{self.id} {self.status}"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def can_transition_to(self, to_status: str) -> bool:
        return is_allowed_transition(self.status, to_status)


class TaskEvent(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16)
    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=200, blank=True)
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.task_id}: {self.from_status or '-'} -> {self.to_status}"


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
        Scheduler,
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
