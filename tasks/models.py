"""Schedulers (named queues), tasks (the queue *is* this table) and their event history."""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import connection, models, transaction
from django.db.models import Q
from django.utils import timezone

from scheduler_site import writers
from tasks.flowkeys import data_key_validator, key_value, parse_rate, rate_limit_validator
from tasks.records import (  # noqa: F401 (re-exported: Django and callers find every model here)
    WAIT_BUCKETS,
    WAIT_COLUMNS,
    FlowHandout,
    FlowState,
    Lock,
    QueueMinute,
    RunnerGrant,
    Worker,
    WorkerKind,
)

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
    # Not handed out before its `expires_at`: never run (DESIGN 9.4). Final, requeue-able.
    EXPIRED = "EXPIRED"


ACTIVE_STATUSES = frozenset({TaskStatus.QUEUED, TaskStatus.DISPATCHED, TaskStatus.RUNNING})
LEASED_STATUSES = frozenset({TaskStatus.DISPATCHED, TaskStatus.RUNNING})
# What an operator may requeue: an attempt still leased or queued has a holder (or is about to
# get one), and requeueing it would hand the same work out twice.
REQUEUEABLE_STATUSES = frozenset(
    {TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED, TaskStatus.EXPIRED}
)
FINAL_STATUSES = frozenset(
    {
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.DEAD,
        TaskStatus.CANCELLED,
        TaskStatus.EXPIRED,
    }
)

# The one table of allowed transitions; services refuse anything else.
# DISPATCHED/RUNNING -> QUEUED is a retry after a failed or lost attempt, or a hand-back
# (runner shutting down, lock held). FAILED/DEAD/CANCELLED/EXPIRED -> QUEUED is an operator's
# requeue. Only a QUEUED task expires: once handed out, its holder runs it.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.DISPATCHED, TaskStatus.CANCELLED, TaskStatus.EXPIRED}),
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
    TaskStatus.EXPIRED: frozenset({TaskStatus.QUEUED}),
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
    # Flow control (DESIGN §9.4; applied by tasks.flow, on a path of its own).
    rate_limit = models.CharField(
        max_length=20,
        blank=True,
        validators=[rate_limit_validator],
        help_text="Most hand-outs (pops and dispatches together) per second, minute or hour, "
        'e.g. "100/s", "600/m", "1000/h". Empty: no limit.',
    )
    concurrency_key = models.CharField(
        max_length=200,
        blank=True,
        validators=[data_key_validator],
        help_text="A key of the task data (dots reach into objects, e.g. org.id): at most "
        "concurrency_limit active tasks per value of it. Empty: no limit.",
    )
    concurrency_limit = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(1_000_000)],
        help_text="With concurrency_key: most DISPATCHED + RUNNING tasks per value.",
    )
    fair_key = models.CharField(
        max_length=200,
        blank=True,
        validators=[data_key_validator],
        help_text="A key of the task data: hand-outs take turns across its values (priority "
        "order within a value). Empty: plain queue order.",
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

    @property
    def flow_controlled(self) -> bool:
        """Whether hand-outs take the flow path (tasks.flow) instead of the plain pop."""
        return bool(self.rate_limit or self.concurrency_key or self.fair_key)

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
        elif self.handler and (
            unknown_handler := writers.call("handler_problem", name=self.handler)
        ):
            errors["handler"] = unknown_handler
        try:
            parse_rate(self.rate_limit)
        except ValueError:
            errors["rate_limit"] = 'Use a count per s, m or h, e.g. "100/s", "600/m", "1000/h".'
        if self.retry_max_delay_seconds < self.retry_delay_seconds:
            errors["retry_max_delay_seconds"] = "Must not be less than retry_delay_seconds."
        if errors:
            raise ValidationError(errors)


# --- one writer of task status -----------------------------------------------------------------
#
# Every change of a task's status is a compare-and-swap with its event row, made by the tasks
# app's writer (tasks.queue, called by tasks.transitions and tasks.reports). An ORM shortcut
# that writes `status` (`Task.objects.update(status=…)`, `bulk_create`, `bulk_update`) would
# skip both the transition table and the event: it is refused unless the writer runs it.

_IN_WRITER: contextvars.ContextVar[bool] = contextvars.ContextVar("in_writer", default=False)


class StatusWriteRefused(RuntimeError):
    """A task status written outside the tasks app's writer (a programming error)."""


@contextmanager
def status_writer() -> Iterator[None]:
    """Marks the writer's own ORM writes of task status (tasks.queue only; and test seeding)."""
    token = _IN_WRITER.set(True)
    try:
        yield
    finally:
        _IN_WRITER.reset(token)


def _refuse_outside_writer(what: str) -> None:
    if not _IN_WRITER.get():
        raise StatusWriteRefused(
            f"{what} writes task status outside the writer; use tasks.transitions.transition, "
            "tasks.reports or tasks.queue, which check ALLOWED_TRANSITIONS and write the event."
        )


class TaskQuerySet(models.QuerySet["Task"]):
    def update(self, **kwargs: Any) -> int:
        if "status" in kwargs:
            _refuse_outside_writer("QuerySet.update(status=...)")
        return super().update(**kwargs)

    def bulk_create(self, objs: Iterable[Task], *args: Any, **kwargs: Any) -> list[Task]:
        _refuse_outside_writer("bulk_create")
        objs = list(objs)
        with transaction.atomic(savepoint=False):  # the keys' locked read holds to the insert
            stamp_flow_values(objs)
            return super().bulk_create(objs, *args, **kwargs)

    def bulk_update(
        self, objs: Iterable[Task], fields: Sequence[str], *args: Any, **kwargs: Any
    ) -> int:
        if "status" in fields:
            _refuse_outside_writer("bulk_update(status)")
        return super().bulk_update(objs, fields, *args, **kwargs)


class Task(models.Model):
    # Not a field: the concurrency and fair values were stamped from a scheduler its caller
    # read under a lock that orders it with a key change (stamp_flow_values), so save() does
    # not read the keys again.
    flow_keys_stamped = False

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
    error = models.TextField(blank=True, help_text="The last failure, in one line.")
    traceback = models.TextField(
        blank=True, help_text="The last failed attempt's full traceback (handler failures)."
    )
    attempts = models.PositiveIntegerField(default=0)
    not_before = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Not handed out by then: never run, ends EXPIRED. Empty: never expires.",
    )
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="Who holds the lease.")
    # A fresh random secret per hand-out (pop or worker claim), cleared when the attempt ends.
    # Holders prove who they are with it: the attempt number is visible to anyone who can GET
    # the task, so it fences stale holders out but proves nothing.
    lease_token = models.CharField(max_length=64, blank=True, default="", editable=False)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # The W3C traceparent of the span that pushed the task (SCHEDULER_OTEL=1; NULL when off):
    # dispatch, pop and the worker's run happen later in other processes and continue this
    # trace from here (scheduler_site.tracing).
    trace_context = models.CharField(  # noqa: DJ001
        max_length=128,
        null=True,
        blank=True,
        editable=False,
        help_text="W3C traceparent of the push (OpenTelemetry tracing); its trace id is the "
        "trace of the task's whole run.",
    )
    lock_waits = models.PositiveIntegerField(
        default=0, help_text="Times handed back because a lock was held (grows the delay)."
    )
    # The task's values of its scheduler's concurrency_key and fair_key, set at insert: an
    # indexed column lets the flow path (tasks.flow) seek the next value instead of reading
    # the JSON of every queued row. NULL: the scheduler has no such key (or the data lacks it).
    concurrency_value = models.CharField(max_length=255, null=True, blank=True, editable=False)  # noqa: DJ001
    fair_value = models.CharField(max_length=255, null=True, blank=True, editable=False)  # noqa: DJ001
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    modified_at = models.DateTimeField(default=timezone.now)

    objects = TaskQuerySet.as_manager()

    class Meta:
        permissions = [
            ("pop_task", "Can pop tasks from a queue"),
            ("report_task", "Can heartbeat tasks and report their status"),
        ]
        indexes = [
            # The queue: only QUEUED rows are in it, so pop stays flat however many
            # finished tasks the table holds.
            # Both partial indexes' `IS NOT NULL` leaves out no row (not_before is NOT NULL;
            # every leased row has a lease expiry): it is there for the planner. With the
            # status alone in the predicate, a write's `id = … AND status = 'QUEUED'` (or
            # 'DISPATCHED') implies it, and with statistics taken while the queue, or the
            # leases, were few the planner read the whole partial index, filtering on the
            # id, instead of the primary key: each report, claim, cancel or flow hand-out's
            # compare-and-swap cost O(queued) or O(leased) (2.8 ms of database CPU a report
            # with 20,000 leased). Only the scans by time (`not_before <=`, `lease_expires_at
            # <`), which every read of these indexes has, imply it.
            models.Index(
                fields=["scheduler", "priority", "created_at", "id"],
                condition=Q(status="QUEUED", not_before__isnull=False),
                name="task_queue_idx",
            ),
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(status__in=["DISPATCHED", "RUNNING"], lease_expires_at__isnull=False),
                name="task_lease_idx",
            ),
            # Counts per status, stats windows and pruning per (scheduler, status).
            models.Index(fields=["scheduler", "status", "modified_at"], name="task_status_idx"),
            # Partial: most tasks have no hash and no schedule, and every status change of
            # a task adds an entry to each index (an indexed column changes, so no update is
            # HOT); lookups name a value, which implies IS NOT NULL, so they still use these.
            models.Index(fields=["hash"], condition=Q(hash__isnull=False), name="task_hash_idx"),
            # The reaper's expiry scan: O(due expiries), only QUEUED rows that can expire.
            models.Index(
                fields=["expires_at"],
                condition=Q(status="QUEUED", expires_at__isnull=False),
                name="task_expiry_idx",
            ),
            models.Index(fields=["created_at", "id"], name="task_created_idx"),
            models.Index(
                fields=["schedule", "created_at"],
                condition=Q(schedule__isnull=False),
                name="task_schedule_idx",
            ),
            # The flow path's seeks: the next value after a cursor, and a value's head in
            # queue order. Partial, so tasks of plain queues cost nothing here.
            models.Index(
                fields=["scheduler", "fair_value", "priority", "created_at", "id"],
                condition=Q(status="QUEUED", fair_value__isnull=False),
                name="task_fair_idx",
            ),
            models.Index(
                fields=["scheduler", "concurrency_value", "priority", "created_at", "id"],
                condition=Q(status="QUEUED", concurrency_value__isnull=False),
                name="task_concurrency_idx",
            ),
            # A value's active count (the concurrency hand-out): O(that value's active tasks),
            # not a read of every active task of the queue, or (task_lease_idx) of all queues.
            models.Index(
                fields=["scheduler", "concurrency_value"],
                condition=Q(status__in=["DISPATCHED", "RUNNING"], concurrency_value__isnull=False),
                name="task_active_value_idx",
            ),
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

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            super().save(*args, **kwargs)
            return
        if self.flow_keys_stamped:  # by a caller holding its scheduler under a lock
            super().save(*args, **kwargs)
            return
        # One transaction for the keys' locked read and the insert (read_flow_keys).
        with transaction.atomic(savepoint=False):
            stamp_flow_values([self])
            super().save(*args, **kwargs)

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def can_transition_to(self, to_status: str) -> bool:
        return is_allowed_transition(self.status, to_status)

    # The state machine, as Django users reach for it. Each method delegates to the one
    # writer (tasks.reports / tasks.services: compare-and-swap plus a TaskEvent) and returns
    # the refreshed task, or raises TransitionRefused (the API's 409). A holder passes its
    # `proof` (tasks.leases.LeaseProof); without one the call is a trusted in-process caller.
    def start(self, *, actor: str = "", proof: Any = None) -> Task:
        return self._write("task_start", actor=actor, attempt=self.attempts, proof=proof)

    def complete(self, result: Any = None, *, actor: str = "", proof: Any = None) -> Task:
        return self._write(
            "task_complete", result=result, actor=actor, attempt=self.attempts, proof=proof
        )

    def fail(self, error: str = "", *, actor: str = "", proof: Any = None) -> Task:
        return self._write(
            "task_fail", error=error, actor=actor, attempt=self.attempts, proof=proof
        )

    def cancel(self, *, actor: str = "") -> Task:
        return self._write("task_cancel", actor=actor)

    def requeue(self, *, actor: str = "") -> Task:
        return self._write("task_requeue", actor=actor)

    def _write(self, name: str, **kwargs: Any) -> Task:
        return writers.call(name, task_id=self.id, **kwargs)


def stamp_flow_values(tasks: Sequence[Task], *, from_cache: bool = False) -> None:
    """Set the concurrency and fair values of new tasks from their scheduler's keys.

    The keys are read under FOR KEY SHARE (read_flow_keys), in the caller's transaction: a
    change of the keys (tasks.services.scheduler_update) holds the scheduler row FOR UPDATE
    while it restamps the active tasks, so an insert stamped here either commits before the
    change starts (and the restamp sees it) or waits for it and reads the new keys. A single
    push stamps `from_cache` (the scheduler it holds): the hot one's statement re-checks those
    keys under the same lock and inserts nothing if they changed (queue.rows); the ORM one read
    its scheduler in the insert's transaction, FOR NO KEY UPDATE on PostgreSQL and under
    SQLite's IMMEDIATE write lock (services.task_push)."""
    new = [task for task in tasks if task._state.adding]
    if not new:
        return
    if from_cache:
        keys = {t.scheduler_id: (t.scheduler.concurrency_key, t.scheduler.fair_key) for t in new}
    else:
        keys = read_flow_keys({task.scheduler_id for task in new})
    for task in new:
        concurrency_key, fair_key = keys.get(task.scheduler_id, ("", ""))
        # A task without the key has the value "": those tasks share one limit, one turn.
        task.concurrency_value = flow_value(task.data, concurrency_key)
        task.fair_value = flow_value(task.data, fair_key)
        task.flow_keys_stamped = from_cache


def read_flow_keys(scheduler_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """The schedulers' (concurrency_key, fair_key), read FOR KEY SHARE on PostgreSQL: the
    lock a task insert's foreign-key check takes anyway, so it serialises nothing but a key
    change (FOR UPDATE). SQLite's IMMEDIATE transactions already serialise every writer.
    The ORM has no FOR KEY SHARE, hence the suffix on its compiled SELECT."""
    query = Scheduler.objects.filter(id__in=list(scheduler_ids)).values_list(
        "id", "concurrency_key", "fair_key"
    )
    sql, params = query.query.sql_with_params()
    if connection.vendor == "postgresql":
        sql += " FOR KEY SHARE"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0]: (row[1], row[2]) for row in cursor.fetchall()}


def flow_value(data: Any, key: str) -> str | None:
    return (key_value(data, key) or "") if key else None


class StatusEvent(models.Model):
    """One change of an object's status: who, when, from, to, why. The event rows of tasks,
    schedules, CEs and pilots share it (and the admin's StatusEventInline shows any of them);
    each adds its foreign key, named by `subject`."""

    subject = ""  # the name of the subclass's foreign key to what changed

    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16)
    at = models.DateTimeField(default=timezone.now)
    actor = models.CharField(max_length=200, blank=True)
    note = models.TextField(blank=True)

    class Meta:
        abstract = True
        ordering = ["at", "id"]

    def __str__(self) -> str:
        subject_id = getattr(self, f"{self.subject}_id")
        return f"{subject_id}: {self.from_status or '-'} -> {self.to_status}"


class TaskEvent(StatusEvent):
    subject = "task"

    # No database constraint (the index stays): its check ran a primary-key lookup and a row
    # lock (FOR KEY SHARE, a WAL record) of the task for every event, that is on every pop,
    # claim, report and push: measured, a seventh of a pop of 100's database time. Every event
    # is written by the statement or transaction that wrote its task, from the rows that
    # statement changed (RETURNING, or the compare-and-swap's winners), so none can name a
    # missing task; deletes cascade in the ORM (on_delete) and pruning deletes events first.
    task = models.ForeignKey(
        Task, on_delete=models.CASCADE, related_name="events", db_constraint=False
    )
    # Indexed on its own: the per-minute rollup and the statistics read events by time.
    at = models.DateTimeField(default=timezone.now, db_index=True)
