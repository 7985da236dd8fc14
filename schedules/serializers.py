from __future__ import annotations

from typing import Any

from rest_framework import serializers

from scheduler_site.api_input import StrictTypes
from schedules import timing
from schedules.models import SCHEDULE_SETTABLE, Schedule
from tasks.models import Scheduler
from tasks.serializers import JSONObjectField


class ScheduleSerializer(StrictTypes, serializers.ModelSerializer):
    scheduler = serializers.SlugRelatedField(slug_field="id", queryset=Scheduler.objects.all())
    cron_description = serializers.SerializerMethodField()
    data = JSONObjectField(required=False)

    class Meta:
        model = Schedule
        fields = [
            "id",
            "scheduler",
            *SCHEDULE_SETTABLE,
            "cron_description",
            "consecutive_failures",
            "paused_reason",
            "status",
            "deadline_at",
            "last_run_at",
            "run_count",
            "created_at",
            "modified_at",
        ]
        read_only_fields = [
            "consecutive_failures",
            "paused_reason",
            "status",
            "deadline_at",
            "last_run_at",
            "run_count",
            "created_at",
            "modified_at",
        ]
        # Uniqueness of (scheduler, hash) and (scheduler, name) is checked by the model's
        # full_clean in the service.
        validators: list[Any] = []
        extra_kwargs = {
            "name": {
                "help_text": "Optional, unique per scheduler; the API takes it for the id "
                "(/api/schedules/{name}/, with ?scheduler= when several have it)."
            }
        }

    def get_cron_description(self, schedule: Schedule) -> str:
        return timing.explain_cron(schedule.cron) if schedule.cron else ""

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        if self.instance is not None and not isinstance(self.instance, list):
            fields["scheduler"].read_only = True  # moving a schedule to another queue: recreate
        return fields

    def validate_timezone(self, value: str) -> str:
        try:
            timing.zone(value)
        except timing.TimingError as exc:
            raise serializers.ValidationError(exc.message) from None
        return value

    def validate_cron(self, value: str) -> str:
        value = " ".join(value.split())
        if value:
            try:
                timing.validate_cron(value)
            except timing.TimingError as exc:
                raise serializers.ValidationError(exc.message) from None
        return value


class ScheduleUpdateSerializer(ScheduleSerializer):
    """What a PATCH may change: all but the scheduler."""

    scheduler = serializers.SlugRelatedField(slug_field="id", read_only=True)
