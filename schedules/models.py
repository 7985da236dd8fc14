"""Schedules: cron, interval or one-off templates that the orchestrator turns into tasks."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils.timezone import now as utc_now

from scheduler_site import writers
from schedules import timing
from tasks.exceptions import InvalidRequest
from tasks.models import Scheduler, StatusEvent
from tasks.registry import check_task_data

logger = logging.getLogger(__name__)


class ScheduleStatus(models.TextChoices):
    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    FINISHED = "FINISHED"


# Resume also reactivates a FINISHED schedule whose edit gave it occurrences again.
SCHEDULE_TRANSITIONS: dict[str, frozenset[str]] = {
    ScheduleStatus.ACTIVE: frozenset({ScheduleStatus.PAUSED, ScheduleStatus.FINISHED}),
    ScheduleStatus.PAUSED: frozenset({ScheduleStatus.ACTIVE, ScheduleStatus.FINISHED}),
    ScheduleStatus.FINISHED: frozenset({ScheduleStatus.ACTIVE}),
}


def validate_schedule_name(value: str) -> None:
    """A name is a label people type (a beat PeriodicTask's name, "nightly report"): any text
    but a "/" (it is a URL path segment), control characters and outer spaces; never shaped
    like a UUID, so that one reference names either an id or a name, never both."""
    problem = None
    if "/" in value or any(ord(char) < 32 or ord(char) == 127 for char in value):
        problem = "must not contain '/' or control characters."
    elif value != value.strip():
        problem = "must not start or end with spaces."
    else:
        try:
            uuid.UUID(value)
            problem = "must not look like a UUID (schedule ids are UUIDs)."
        except ValueError:
            pass
    if problem:
        raise ValidationError(problem)


class Schedule(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    scheduler = models.ForeignKey(
        Scheduler, on_delete=models.CASCADE, related_name="schedules", db_index=False
    )
    # NULL for "no name" (the uniqueness per scheduler ignores nameless schedules).
    name = models.CharField(  # noqa: DJ001
        max_length=200,
        null=True,
        blank=True,
        validators=[validate_schedule_name],
        help_text="Optional, unique per scheduler: the API and CLI take it for the id.",
    )
    # NULL, not "", for "no hash": uniqueness per scheduler must ignore hash-less schedules.
    hash = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    data = models.JSONField(default=dict, blank=True)
    priority = models.IntegerField(default=0, help_text="Of the tasks it makes; lower first.")
    cron = models.CharField(max_length=120, blank=True, help_text="5 fields, in `timezone`.")
    interval_seconds = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    run_at = models.DateTimeField(null=True, blank=True, help_text="One-off run time.")
    timezone = models.CharField(max_length=64, default="UTC")
    start_at = models.DateTimeField(null=True, blank=True)
    end_at = models.DateTimeField(null=True, blank=True)
    min_interval_seconds = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    max_interval_seconds = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    backoff_factor = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1.0), MaxValueValidator(100.0)],
        help_text="Adaptive interval: grown by this factor after an uneventful run.",
    )
    expire_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Its tasks expire this long after their occurrence if not handed out by then.",
    )
    failure_backoff_factor = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1.0), MaxValueValidator(100.0)],
        help_text="After a failed run the next one waits interval * factor^failures (capped).",
    )
    failure_backoff_max_seconds = models.PositiveIntegerField(
        default=86400,
        validators=[MinValueValidator(1)],
        help_text="Cap of the failure cooldown (a cron schedule: its next occurrence after it).",
    )
    max_consecutive_failures = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Pause the schedule after this many failed runs in a row. Empty: never.",
    )
    consecutive_failures = models.PositiveIntegerField(
        default=0, editable=False, help_text="Failed runs in a row (FAILED or DEAD tasks)."
    )
    paused_reason = models.CharField(
        max_length=300, blank=True, default="", editable=False, help_text="Why it is PAUSED."
    )
    status = models.CharField(
        max_length=16, choices=ScheduleStatus.choices, default=ScheduleStatus.ACTIVE
    )
    deadline_at = models.DateTimeField(null=True, blank=True, help_text="Next due time (UTC).")
    last_run_at = models.DateTimeField(null=True, blank=True)
    run_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=utc_now, editable=False)
    modified_at = models.DateTimeField(default=utc_now)

    class Meta:
        indexes = [
            # The tick's only scan: due ACTIVE schedules of one scheduler, a range on
            # deadline_at. It stays O(due) whatever the table's size.
            models.Index(
                fields=["scheduler", "deadline_at"],
                condition=Q(status="ACTIVE"),
                name="schedule_due_idx",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["scheduler", "hash"],
                condition=Q(hash__isnull=False),
                name="schedule_hash_uniq",
            ),
            models.UniqueConstraint(
                fields=["scheduler", "name"],
                condition=Q(name__isnull=False),
                name="schedule_name_uniq",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.scheduler_id}/{self.name or self.hash or self.id}"

    @property
    def kind(self) -> str:
        if self.cron:
            return "cron"
        return "interval" if self.interval_seconds else "once"

    @property
    def task_hash(self) -> str:
        """The hash of the tasks it makes: one active task per schedule, by construction."""
        return self.hash or f"schedule:{self.id}"

    def can_transition_to(self, to_status: str) -> bool:
        return to_status in SCHEDULE_TRANSITIONS.get(self.status, frozenset())

    # The state machine, as Django users reach for it: each delegates to the schedules
    # services (compare-and-swap plus a ScheduleEvent) and returns the refreshed schedule, or
    # raises the refusal the API answers with 409.
    def pause(self, *, actor: str = "") -> Schedule:
        return writers.call("schedule_pause", schedule_id=self.id, actor=actor)

    def resume(self, *, actor: str = "") -> Schedule:
        return writers.call("schedule_resume", schedule_id=self.id, actor=actor)

    def finish(self, *, actor: str = "") -> Schedule:
        return writers.call("schedule_finish", schedule_id=self.id, actor=actor)

    def clean(self) -> None:
        errors: dict[str, str] = {}
        given = [name for name in ("cron", "interval_seconds", "run_at") if getattr(self, name)]
        if len(given) != 1:
            message = "Give exactly one of cron, interval_seconds, run_at"
            message += f" (got {', '.join(given)})." if given else " (got none)."
            errors["cron" if "cron" in given or not given else given[0]] = message
        if self.hash and self._taken(hash=self.hash):
            # The constraint is conditional, so Django would report it under __all__: name it.
            errors["hash"] = f"Scheduler {self.scheduler_id!r} has a schedule with this hash."
        if self.name == "":
            self.name = None  # blank is no name
        if self.name and self._taken(name=self.name):
            errors["name"] = f"Scheduler {self.scheduler_id!r} has a schedule with this name."
        for check in (self._check_timing, self._check_window, self._check_adaptive):
            try:
                check()
            except timing.TimingError as exc:
                errors.setdefault(exc.field, exc.message)
        scheduler = Scheduler.objects.filter(id=self.scheduler_id).first()
        if scheduler is not None and "data" not in errors:
            try:  # what its queue's handler could never run (a celery: task's arguments)
                check_task_data(scheduler, self.data)
            except InvalidRequest as exc:
                errors["data"] = exc.message.removeprefix("data: ")
        if errors:
            raise ValidationError(errors)

    def _taken(self, **unique: str) -> bool:
        others = Schedule.objects.filter(scheduler_id=self.scheduler_id, **unique)
        return others.exclude(pk=self.pk).exists()

    def _check_timing(self) -> None:
        timing.zone(self.timezone)
        if self.cron:
            timing.validate_cron(self.cron)
        if self.interval_seconds is not None and self.interval_seconds < 1:
            raise timing.TimingError("interval_seconds", "must be at least 1 second.")

    def _check_window(self) -> None:
        if self.start_at and self.end_at and self.end_at <= self.start_at:
            raise timing.TimingError("end_at", "must be after start_at.")

    def _check_adaptive(self) -> None:
        adaptive = [self.min_interval_seconds, self.max_interval_seconds, self.backoff_factor]
        if not any(value is not None for value in adaptive):
            return
        if not self.interval_seconds:
            raise timing.TimingError("backoff_factor", "adaptive intervals need interval_seconds.")
        if None in adaptive:
            raise timing.TimingError(
                "backoff_factor",
                "give min_interval_seconds, max_interval_seconds and backoff_factor together.",
            )
        if self.min_interval_seconds > self.max_interval_seconds:
            raise timing.TimingError("max_interval_seconds", "must be ≥ min_interval_seconds.")

    def next_occurrence(self, *, after: datetime) -> datetime | None:
        """The first due time strictly after `after`, or None when there is none left."""
        if self.run_at:
            candidate = None  # a one-off has no next occurrence once it ran
        elif self.cron:
            # An occurrence exactly at start_at counts: step back a microsecond.
            start = (
                max(after, self.start_at - timedelta(microseconds=1)) if self.start_at else after
            )
            candidate = timing.next_cron(self.cron, self.timezone, after=start)
            if candidate is None:
                # Refused on create and edit (validate_cron), but a row from before that, or
                # one starting near the year 9999, finishes here instead of failing each tick.
                logger.warning(
                    "schedule %s: cron %r has no occurrence in 50 years after %s; finishing it",
                    self.id,
                    self.cron,
                    start,
                )
        else:
            anchor = self.start_at or self.deadline_at or self.created_at
            candidate = timing.next_interval(
                anchor=anchor, interval_seconds=self.interval_seconds, after=after
            )
        if candidate and self.end_at and candidate > self.end_at:
            return None
        return candidate

    def first_deadline(self, *, now: datetime) -> datetime | None:
        """Due time on creation, resume or edit: from now, firing at once only when due."""
        if self.run_at:
            ran_since = self.last_run_at is not None and self.last_run_at >= self.run_at
            return None if ran_since else self.run_at
        if self.interval_seconds and self.last_run_at is None:
            start = self.start_at or now
            return None if self.end_at and start > self.end_at else start
        if self.interval_seconds:
            # On the grid of the last run and the current interval, not from the old deadline:
            # an edited interval takes effect now rather than after one more run at the old pace.
            candidate = timing.next_interval(
                anchor=self.start_at or self.last_run_at,
                interval_seconds=self.interval_seconds,
                after=now,
            )
            return None if self.end_at and candidate > self.end_at else candidate
        # A cron occurrence exactly at `now` is due now.
        return self.next_occurrence(after=now - timedelta(microseconds=1))


class ScheduleEvent(StatusEvent):
    """One change of a schedule's status: who, when, from, to, why."""

    subject = "schedule"

    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="events")

    class Meta(StatusEvent.Meta):
        indexes = [models.Index(fields=["schedule", "at"], name="schedule_event_idx")]


# What an operator sets on a schedule (besides its queue, on creation), through the API, the
# CLI and the admin alike: one list, so that they cannot disagree.
SCHEDULE_SETTABLE = (
    "name",
    "hash",
    "data",
    "priority",
    "cron",
    "interval_seconds",
    "run_at",
    "timezone",
    "start_at",
    "end_at",
    "min_interval_seconds",
    "max_interval_seconds",
    "backoff_factor",
    "expire_seconds",
    "failure_backoff_factor",
    "failure_backoff_max_seconds",
    "max_consecutive_failures",
)
