from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from drf_spectacular.utils import extend_schema_field

from tasks.models import Task, TaskStatus, Worker, WorkerKind

INT_MIN, INT_MAX = -(2**31), 2**31 - 1


@extend_schema_field({"type": "integer", "minimum": INT_MIN, "maximum": INT_MAX})
class IntegerFilter(django_filters.NumberFilter):
    """An integer (django-filter's NumberFilter takes decimals), within PostgreSQL's integer."""

    field_class = forms.IntegerField

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, min_value=INT_MIN, max_value=INT_MAX, **kwargs)


class TaskFilter(django_filters.FilterSet):
    scheduler = django_filters.CharFilter(field_name="scheduler_id")
    schedule = django_filters.UUIDFilter(field_name="schedule_id")
    status = django_filters.MultipleChoiceFilter(choices=TaskStatus.choices)
    hash = django_filters.CharFilter()
    priority = IntegerFilter()
    created_after = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    modified_after = django_filters.IsoDateTimeFilter(field_name="modified_at", lookup_expr="gte")
    modified_before = django_filters.IsoDateTimeFilter(field_name="modified_at", lookup_expr="lt")
    expires_before = django_filters.IsoDateTimeFilter(field_name="expires_at", lookup_expr="lt")

    class Meta:
        model = Task
        fields = ["scheduler", "schedule", "status", "hash", "priority"]


class WorkerFilter(django_filters.FilterSet):
    kind = django_filters.ChoiceFilter(choices=WorkerKind.choices)

    class Meta:
        model = Worker
        fields = ["kind"]
