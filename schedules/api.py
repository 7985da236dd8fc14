"""REST views for schedules: validate, call one service, render."""

from __future__ import annotations

import uuid

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from scheduler_site.api_helpers import ERROR, actor
from scheduler_site.api_input import CursorPagination, StrictBodyMixin
from schedules import selectors, services
from schedules.filters import ScheduleFilter
from schedules.models import Schedule
from schedules.serializers import ScheduleSerializer, ScheduleUpdateSerializer
from tasks.serializers import TaskSerializer


class ScheduleCursorPagination(CursorPagination):
    ordering = ("-created_at", "-id")


@extend_schema_view(partial_update=extend_schema(request=ScheduleUpdateSerializer))
class ScheduleViewSet(StrictBodyMixin, viewsets.ModelViewSet):
    """Schedules. `{id}` is a schedule's id or its name; a name in several schedulers needs
    `?scheduler=` (400 on `scheduler` without it)."""

    queryset = Schedule.objects.all()
    serializer_class = ScheduleSerializer
    # No PUT: the README's API has PATCH; a PUT would need the id (or name, or scheduler) that
    # an update cannot change.
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    filterset_class = ScheduleFilter
    pagination_class = ScheduleCursorPagination
    # An id, or a name (any text but "/"): find_schedule tells them apart, a name being never
    # shaped like a UUID. Dots are allowed (names like "proj.tasks.report"), so a format
    # suffix needs ?format= here.
    lookup_value_regex = r"[^/]+"
    action_permissions = {
        "pause": ["schedules.change_schedule"],
        "resume": ["schedules.change_schedule"],
        "trigger": ["schedules.change_schedule", "tasks.add_task"],
    }

    def get_object(self) -> Schedule:
        """By id or by name; `?scheduler=` (a filter, like every other) says which scheduler's
        when a name is in several."""
        queryset = self.filter_queryset(self.get_queryset())
        schedule = selectors.find_schedule(self.kwargs["pk"], queryset=queryset)
        self.check_object_permissions(self.request, schedule)
        return schedule

    def _schedule_id(self) -> uuid.UUID:
        return self.get_object().id

    def perform_create(self, serializer: ScheduleSerializer) -> None:
        data = dict(serializer.validated_data)
        scheduler = data.pop("scheduler")
        serializer.instance = services.schedule_create(
            scheduler_id=scheduler.id, actor=actor(self.request), **data
        )

    def perform_update(self, serializer: ScheduleSerializer) -> None:
        serializer.instance = services.schedule_update(
            schedule_id=serializer.instance.id,
            actor=actor(self.request),
            **serializer.validated_data,
        )

    def perform_destroy(self, instance: Schedule) -> None:
        services.schedule_delete(schedule_id=instance.id)

    @extend_schema(request=None, responses={200: ScheduleSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def pause(self, request: Request, pk: str) -> Response:
        schedule = self.get_object().pause(actor=actor(request))
        return Response(ScheduleSerializer(schedule).data)

    @extend_schema(request=None, responses={200: ScheduleSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def resume(self, request: Request, pk: str) -> Response:
        schedule = self.get_object().resume(actor=actor(request))
        return Response(ScheduleSerializer(schedule).data)

    @extend_schema(
        request=None, responses={201: TaskSerializer, 404: ERROR, 409: ERROR, 429: ERROR}
    )
    @action(detail=True, methods=["post"], takes_body=False)
    def trigger(self, request: Request, pk: str) -> Response:
        task = services.schedule_trigger(schedule_id=self._schedule_id(), actor=actor(request))
        return Response(TaskSerializer(task).data, status=status.HTTP_201_CREATED)
