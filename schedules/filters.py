from __future__ import annotations

import django_filters

from schedules.models import Schedule, ScheduleStatus


class ScheduleFilter(django_filters.FilterSet):
    scheduler = django_filters.CharFilter(field_name="scheduler_id")
    status = django_filters.MultipleChoiceFilter(choices=ScheduleStatus.choices)
    hash = django_filters.CharFilter()
    name = django_filters.CharFilter()
    due_before = django_filters.IsoDateTimeFilter(field_name="deadline_at", lookup_expr="lte")
    due_after = django_filters.IsoDateTimeFilter(field_name="deadline_at", lookup_expr="gte")

    class Meta:
        model = Schedule
        fields = ["scheduler", "status", "hash", "name"]
