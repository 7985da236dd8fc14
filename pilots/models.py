"""Virtual Organisations, Compute Elements and the pilots submitted to them (DiracX's tutorial
design, made real)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from pilots import backend_registry
from scheduler_site import writers
from tasks.models import StatusEvent

name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
    "Use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit.",
)


class VirtualOrganisation(models.Model):
    name = models.CharField(max_length=100, unique=True, validators=[name_validator])
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]
        verbose_name = "virtual organisation"

    def __str__(self) -> str:
        return self.name


class CEStatus(models.TextChoices):
    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"  # no new pilots; running ones finish
    BANNED = "BANNED"  # no new pilots; SUBMITTED ones are failed


CE_TRANSITIONS: dict[str, frozenset[str]] = {
    CEStatus.ACTIVE: frozenset({CEStatus.DRAINING, CEStatus.BANNED}),
    CEStatus.DRAINING: frozenset({CEStatus.ACTIVE, CEStatus.BANNED}),
    CEStatus.BANNED: frozenset({CEStatus.ACTIVE, CEStatus.DRAINING}),
}


class ComputeElement(models.Model):
    name = models.CharField(max_length=100, unique=True, validators=[name_validator])
    capacity = models.PositiveIntegerField(default=1, help_text="Pilot slots.")
    reliability = models.FloatField(
        default=0.9,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="0..1: chance that a submission succeeds and that a pilot ends DONE.",
    )
    vos = models.ManyToManyField(VirtualOrganisation, related_name="compute_elements", blank=True)
    # The registered backends (pilots.backends registers them; the registry imports no model).
    backend = models.CharField(
        max_length=20, choices=backend_registry.choices, default=backend_registry.DEFAULT_BACKEND
    )
    backend_settings = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=CEStatus.choices, default=CEStatus.ACTIVE)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    modified_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        verbose_name = "compute element"

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        # An edit (API, admin) moves modified_at; ce_set_status sets it in its own UPDATE.
        if not self._state.adding:
            self.modified_at = timezone.now()
            if kwargs.get("update_fields") is not None:
                kwargs["update_fields"] = {*kwargs["update_fields"], "modified_at"}
        super().save(*args, **kwargs)

    def clean(self) -> None:
        backend_registry.check_settings(self.backend, self.backend_settings)

    def can_transition_to(self, to_status: str) -> bool:
        return to_status in CE_TRANSITIONS.get(self.status, frozenset())

    # The state machine: each delegates to pilots.services.ce_set_status (compare-and-swap
    # plus a ComputeElementEvent) and returns the refreshed CE, or raises the 409 refusal.
    def drain(self, *, actor: str = "") -> ComputeElement:
        return self._set_status(CEStatus.DRAINING, actor=actor)

    def ban(self, *, actor: str = "") -> ComputeElement:
        return self._set_status(CEStatus.BANNED, actor=actor)

    def activate(self, *, actor: str = "") -> ComputeElement:
        return self._set_status(CEStatus.ACTIVE, actor=actor)

    def _set_status(self, to_status: str, *, actor: str) -> ComputeElement:
        return writers.call("ce_set_status", name=self.name, to_status=to_status, actor=actor)


# drain / ban / activate as the admin's actions and the API's endpoints pass them around.
CEMove = Callable[..., ComputeElement]


class PilotStatus(models.TextChoices):
    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


ACTIVE_PILOT_STATUSES = frozenset({PilotStatus.SUBMITTED, PilotStatus.RUNNING})
PILOT_TRANSITIONS: dict[str, frozenset[str]] = {
    PilotStatus.SUBMITTED: frozenset({PilotStatus.RUNNING, PilotStatus.FAILED}),
    PilotStatus.RUNNING: frozenset({PilotStatus.DONE, PilotStatus.FAILED}),
    PilotStatus.DONE: frozenset(),
    PilotStatus.FAILED: frozenset(),
}


class PilotSubmission(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    ce = models.ForeignKey(ComputeElement, on_delete=models.PROTECT, related_name="pilots")
    vo = models.ForeignKey(VirtualOrganisation, on_delete=models.PROTECT, related_name="pilots")
    status = models.CharField(
        max_length=16, choices=PilotStatus.choices, default=PilotStatus.SUBMITTED
    )
    external_id = models.CharField(max_length=200, blank=True)
    submitted_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(default=timezone.now, help_text="Last news from the CE.")
    failure_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-submitted_at"]
        indexes = [
            # Free slots = capacity - active pilots: counted per CE on every submission.
            models.Index(
                fields=["ce", "status"],
                condition=Q(status__in=["SUBMITTED", "RUNNING"]),
                name="pilot_active_idx",
            ),
            models.Index(fields=["vo", "status"], name="pilot_vo_status_idx"),
            models.Index(fields=["submitted_at"], name="pilot_submitted_idx"),
        ]

    def __str__(self) -> str:
        return f"pilot {self.id} on {self.ce_id} ({self.status})"

    def can_transition_to(self, to_status: str) -> bool:
        return to_status in PILOT_TRANSITIONS.get(self.status, frozenset())

    # The state machine: each delegates to pilots.services.pilot_mark (compare-and-swap plus a
    # PilotEvent) and returns the refreshed pilot, or raises the 409 refusal.
    def mark_running(self, *, actor: str = "") -> PilotSubmission:
        return self._mark(PilotStatus.RUNNING, actor=actor)

    def mark_done(self, *, actor: str = "") -> PilotSubmission:
        return self._mark(PilotStatus.DONE, actor=actor)

    def mark_failed(self, reason: str, *, actor: str = "") -> PilotSubmission:
        return self._mark(PilotStatus.FAILED, reason=reason, actor=actor)

    def _mark(self, to_status: str, **kwargs: Any) -> PilotSubmission:
        return writers.call("pilot_mark", pilot_id=self.id, to_status=to_status, **kwargs)


class PilotReport(models.Model):
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    by_status = models.JSONField(default=dict)
    by_ce = models.JSONField(default=dict, help_text="{ce: {status: count}}")
    by_vo = models.JSONField(default=dict, help_text="{vo: {status: count}}")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"pilot report {self.created_at:%Y-%m-%d %H:%M}"


class ComputeElementEvent(StatusEvent):
    """One change of a CE's status (drain, ban, activate): who, when, from, to."""

    subject = "ce"

    ce = models.ForeignKey(ComputeElement, on_delete=models.CASCADE, related_name="events")

    class Meta(StatusEvent.Meta):
        indexes = [models.Index(fields=["ce", "at"], name="ce_event_idx")]


class PilotEvent(StatusEvent):
    """One change of a pilot's status: who, when, from, to, why."""

    subject = "pilot"

    pilot = models.ForeignKey(PilotSubmission, on_delete=models.CASCADE, related_name="events")

    class Meta(StatusEvent.Meta):
        indexes = [models.Index(fields=["pilot", "at"], name="pilot_event_idx")]
