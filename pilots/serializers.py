from __future__ import annotations

from typing import Any

from rest_framework import serializers

from pilots.backend_registry import DEFAULT_BACKEND, check_settings
from pilots.models import ComputeElement, PilotReport, PilotSubmission, VirtualOrganisation
from scheduler_site.api_input import StrictTypes
from tasks.serializers import JSONObjectField


class VOSerializer(StrictTypes, serializers.ModelSerializer):
    class Meta:
        model = VirtualOrganisation
        fields = ["name", "enabled", "created_at"]
        read_only_fields = ["created_at"]


class ComputeElementSerializer(StrictTypes, serializers.ModelSerializer):
    vos = serializers.SlugRelatedField(
        slug_field="name", many=True, queryset=VirtualOrganisation.objects.all(), required=False
    )
    backend_settings = JSONObjectField(required=False)
    active_pilots = serializers.SerializerMethodField()
    free_slots = serializers.SerializerMethodField()

    class Meta:
        model = ComputeElement
        fields = [
            "name",
            "capacity",
            "reliability",
            "vos",
            "backend",
            "backend_settings",
            "status",
            "active_pilots",
            "free_slots",
            "created_at",
            "modified_at",
        ]
        read_only_fields = ["status", "created_at", "modified_at"]

    def get_active_pilots(self, ce: ComputeElement) -> int:
        return self.context.get("active", {}).get(ce.id, 0)

    def get_free_slots(self, ce: ComputeElement) -> int:
        return max(ce.capacity - self.get_active_pilots(ce), 0)

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        if self.instance is not None and not isinstance(self.instance, list):
            fields["name"].read_only = True
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        def current(field: str, default: Any) -> Any:
            return attrs.get(field, getattr(self.instance, field, default))

        check_settings(current("backend", DEFAULT_BACKEND), current("backend_settings", {}))
        return attrs


class ComputeElementUpdateSerializer(ComputeElementSerializer):
    """What a PATCH may change: all but the name."""

    class Meta(ComputeElementSerializer.Meta):
        read_only_fields = [*ComputeElementSerializer.Meta.read_only_fields, "name"]


class PilotSerializer(serializers.ModelSerializer):
    ce = serializers.SlugRelatedField(slug_field="name", read_only=True)
    vo = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = PilotSubmission
        fields = [
            "id",
            "ce",
            "vo",
            "status",
            "external_id",
            "submitted_at",
            "started_at",
            "finished_at",
            "failure_reason",
        ]
        read_only_fields = fields


class SubmitSerializer(StrictTypes):
    vo = serializers.CharField(max_length=100)


class PilotReportSerializer(serializers.ModelSerializer):
    class Meta:
        model = PilotReport
        fields = ["id", "created_at", "by_status", "by_ce", "by_vo"]


class SummarySerializer(serializers.Serializer):
    by_status = serializers.DictField(child=serializers.IntegerField())
    by_ce = serializers.DictField(child=serializers.DictField(child=serializers.IntegerField()))
    by_vo = serializers.DictField(child=serializers.DictField(child=serializers.IntegerField()))
