"""REST views for schedules: validate, call one service, render."""

from __future__ import annotations

import uuid

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from scheduler_site.api_input import CursorPagination, StrictBodyMixin
from schedules import services
from schedules.filters import ScheduleFilter
from schedules.models import Schedule
from schedules.serializers import ScheduleSerializer, ScheduleUpdateSerializer
from tasks.api import UUID_PATTERN
from tasks.serializers import TaskSerializer

ERROR = OpenApiResponse(description="Error: {'detail': ...} or field errors.")


def _actor(request: Request) -> str:
    return getattr(request.user, "username", "") or "anonymous"


class ScheduleCursorPagination(CursorPagination):
    ordering = ("-created_at", "-id")


@extend_schema_view(partial_update=extend_schema(request=ScheduleUpdateSerializer))
class ScheduleViewSet(StrictBodyMixin, viewsets.ModelViewSet):
    queryset = Schedule.objects.all()
    serializer_class = ScheduleSerializer
    # No PUT: the README's API has PATCH; a PUT would need the id (or name, or scheduler) that
    # an update cannot change.
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    filterset_class = ScheduleFilter
    pagination_class = ScheduleCursorPagination
    lookup_value_regex = UUID_PATTERN  # anything uuid.UUID() refuses is a 404, not a 500
    action_permissions = {
        "pause": ["schedules.change_schedule"],
        "resume": ["schedules.change_schedule"],
        "trigger": ["schedules.change_schedule", "tasks.add_task"],
    }

    def _schedule_id(self) -> uuid.UUID:
        return uuid.UUID(self.kwargs["pk"])

    def perform_create(self, serializer: ScheduleSerializer) -> None:
        data = dict(serializer.validated_data)
        scheduler = data.pop("scheduler")
        serializer.instance = services.schedule_create(
            scheduler_id=scheduler.id, actor=_actor(self.request), **data
        )

    def perform_update(self, serializer: ScheduleSerializer) -> None:
        serializer.instance = services.schedule_update(
            schedule_id=serializer.instance.id,
            actor=_actor(self.request),
            **serializer.validated_data,
        )

    def perform_destroy(self, instance: Schedule) -> None:
        services.schedule_delete(schedule_id=instance.id)

    @extend_schema(request=None, responses={200: ScheduleSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def pause(self, request: Request, pk: str) -> Response:
        schedule = services.schedule_pause(schedule_id=self._schedule_id(), actor=_actor(request))
        return Response(ScheduleSerializer(schedule).data)

    @extend_schema(request=None, responses={200: ScheduleSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def resume(self, request: Request, pk: str) -> Response:
        schedule = services.schedule_resume(schedule_id=self._schedule_id(), actor=_actor(request))
        return Response(ScheduleSerializer(schedule).data)

    @extend_schema(
        request=None, responses={201: TaskSerializer, 404: ERROR, 409: ERROR, 429: ERROR}
    )
    @action(detail=True, methods=["post"], takes_body=False)
    def trigger(self, request: Request, pk: str) -> Response:
        task = services.schedule_trigger(schedule_id=self._schedule_id(), actor=_actor(request))
        return Response(TaskSerializer(task).data, status=status.HTTP_201_CREATED)
