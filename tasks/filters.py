from __future__ import annotations

import django_filters

from tasks.models import Task, TaskStatus


class TaskFilter(django_filters.FilterSet):
    scheduler = django_filters.CharFilter(field_name="scheduler_id")
    schedule = django_filters.UUIDFilter(field_name="schedule_id")
    status = django_filters.MultipleChoiceFilter(choices=TaskStatus.choices)
    hash = django_filters.CharFilter()
    created_after = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    modified_after = django_filters.IsoDateTimeFilter(field_name="modified_at", lookup_expr="gte")
    modified_before = django_filters.IsoDateTimeFilter(field_name="modified_at", lookup_expr="lt")

    class Meta:
        model = Task
        fields = ["scheduler", "schedule", "status", "hash", "priority"]
