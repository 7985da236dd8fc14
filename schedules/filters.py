from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet

from schedules.models import Schedule, ScheduleStatus


class ScheduleFilter(django_filters.FilterSet):
    scheduler = django_filters.CharFilter(field_name="scheduler_id")
    status = django_filters.MultipleChoiceFilter(choices=ScheduleStatus.choices)
    hash = django_filters.CharFilter()
    name = django_filters.CharFilter()
    due_before = django_filters.IsoDateTimeFilter(field_name="deadline_at", lookup_expr="lte")
    due_after = django_filters.IsoDateTimeFilter(field_name="deadline_at", lookup_expr="gte")
    failing = django_filters.BooleanFilter(
        method="filter_failing",
        label="true: only those whose last run failed (consecutive_failures > 0); false: the rest.",
    )

    def filter_failing(self, queryset: QuerySet[Schedule], name: str, value: bool | None) -> Any:
        if value is None:
            return queryset
        return (
            queryset.filter(consecutive_failures__gt=0)
            if value
            else queryset.filter(consecutive_failures=0)
        )

    class Meta:
        model = Schedule
        fields = ["scheduler", "status", "hash", "name"]
