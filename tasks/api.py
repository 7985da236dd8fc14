"""REST views for schedulers and tasks: validate, call one service, render."""

from __future__ import annotations

import uuid
from typing import Any

from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from scheduler_site.api_input import CursorPagination, StrictBodyMixin
from scheduler_site.permissions import (
    ModelActionPermissions,
    QueueScopePermission,
    TaskScopePermission,
    queue_scope,
)
from tasks import selectors, services
from tasks.filters import TaskFilter
from tasks.leases import LeaseProof
from tasks.models import Scheduler, Task
from tasks.serializers import (
    HeartbeatSerializer,
    PoppedTaskSerializer,
    PopSerializer,
    ReleaseSerializer,
    SchedulerSerializer,
    SchedulerUpdateSerializer,
    StatsQuerySerializer,
    StatsRowSerializer,
    TaskEventSerializer,
    TaskPushSerializer,
    TaskReportSerializer,
    TaskSerializer,
)

# Only strings uuid.UUID() accepts (32 hex digits, dashes optional): anything else is a 404
# from the router, never a ValueError in the view.
UUID_PATTERN = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
ERROR = OpenApiResponse(description="Error: {'detail': ...} or field errors.")
POP_RESPONSE = inline_serializer("PopResponse", {"results": PoppedTaskSerializer(many=True)})
RUNNER_PERMS = ["tasks.report_task"]
OPERATOR_PERM = "tasks.change_task"


def _actor(request: Request) -> str:
    return getattr(request.user, "username", "") or "anonymous"


def _is_operator(request: Request) -> bool:
    return request.user.has_perm(OPERATOR_PERM)


def _proof(request: Request, body: dict[str, Any]) -> LeaseProof:
    """The caller's claim to a task's lease: the token in the body (taken out of it), or, for
    an operator, none at all (an override the event records)."""
    return LeaseProof(token=body.pop("lease_token", None), operator=_is_operator(request))


class TaskCursorPagination(CursorPagination):
    # Cursor paging needs no COUNT(*), so listing stays cheap on a table of millions.
    ordering = ("-created_at", "-id")


@extend_schema_view(
    partial_update=extend_schema(request=SchedulerUpdateSerializer),
    destroy=extend_schema(responses={204: None, 409: ERROR}),  # while tasks are active
)
class SchedulerViewSet(StrictBodyMixin, viewsets.ModelViewSet):
    queryset = Scheduler.objects.all()
    serializer_class = SchedulerSerializer
    # No PUT: the README's API has PATCH; a PUT would need the id (or name, or scheduler) that
    # an update cannot change.
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    lookup_value_regex = r"[a-z0-9][a-z0-9_-]{0,63}"
    permission_classes = [ModelActionPermissions, QueueScopePermission]
    action_permissions = {
        "pause": ["tasks.change_scheduler"],
        "resume": ["tasks.change_scheduler"],
        "push": ["tasks.add_task"],
        "pop": ["tasks.pop_task"],
    }

    def get_queryset(self) -> Any:
        return selectors.scheduler_list(queues=queue_scope(self.request))

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        if self.action in {"list", "retrieve"}:
            ids = [self.kwargs["pk"]] if "pk" in self.kwargs else None
            context["counts"] = selectors.status_counts(ids)
        return context

    def perform_create(self, serializer: SchedulerSerializer) -> None:
        serializer.instance = services.scheduler_create(**serializer.validated_data)

    def perform_update(self, serializer: SchedulerSerializer) -> None:
        serializer.instance = services.scheduler_update(
            scheduler=serializer.instance, **serializer.validated_data
        )

    def perform_destroy(self, instance: Scheduler) -> None:
        services.scheduler_delete(scheduler_id=instance.id)

    @extend_schema(request=None, responses={200: SchedulerSerializer, 404: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def pause(self, request: Request, pk: str) -> Response:
        scheduler = services.scheduler_set_paused(
            scheduler_id=pk, paused=True, actor=_actor(request)
        )
        return Response(self.get_serializer(scheduler).data)

    @extend_schema(request=None, responses={200: SchedulerSerializer, 404: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def resume(self, request: Request, pk: str) -> Response:
        scheduler = services.scheduler_set_paused(
            scheduler_id=pk, paused=False, actor=_actor(request)
        )
        return Response(self.get_serializer(scheduler).data)

    @extend_schema(
        request=TaskPushSerializer,
        responses={201: TaskSerializer, 400: ERROR, 404: ERROR, 409: ERROR, 429: ERROR},
    )
    @action(detail=True, methods=["post"])
    def push(self, request: Request, pk: str) -> Response:
        body = TaskPushSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        task = services.task_push(scheduler_id=pk, actor=_actor(request), **body.validated_data)
        return Response(TaskSerializer(task).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=PopSerializer,
        responses={
            200: POP_RESPONSE,
            400: ERROR,
            404: ERROR,
            409: OpenApiResponse(description="A celery queue: its tasks are not popped."),
        },
    )
    @action(detail=True, methods=["post"])
    def pop(self, request: Request, pk: str) -> Response:
        body = PopSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        tasks = services.task_pop(scheduler_id=pk, worker=_actor(request), **body.validated_data)
        # The pop's answer is the one place a runner learns its lease tokens.
        return Response({"results": PoppedTaskSerializer(tasks, many=True).data})


class TaskViewSet(
    StrictBodyMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    queryset = Task.objects.all()
    serializer_class = TaskSerializer
    filterset_class = TaskFilter
    pagination_class = TaskCursorPagination
    lookup_value_regex = UUID_PATTERN
    permission_classes = [ModelActionPermissions, TaskScopePermission]
    action_permissions = {
        "partial_update": RUNNER_PERMS,
        "heartbeat": RUNNER_PERMS,
        "release": RUNNER_PERMS,
        "cancel": ["tasks.change_task"],
        "requeue": ["tasks.change_task"],
        "events": ["tasks.view_task"],
        "stats": ["tasks.view_task"],
    }

    def get_queryset(self) -> Any:
        return selectors.task_list(queues=queue_scope(self.request))

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        context["show_lease_token"] = _is_operator(self.request)
        return context

    def _render(self, task: Task) -> Response:
        return Response(self.get_serializer(task).data)

    def _task_id(self) -> uuid.UUID:
        return uuid.UUID(self.kwargs["pk"])

    @extend_schema(
        request=TaskReportSerializer,
        responses={200: TaskSerializer, 400: ERROR, 404: ERROR, 409: ERROR},
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        body = TaskReportSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        task = services.task_report(
            task_id=self._task_id(), actor=_actor(request), proof=_proof(request, data), **data
        )
        return self._render(task)

    @extend_schema(
        request=HeartbeatSerializer, responses={200: TaskSerializer, 404: ERROR, 409: ERROR}
    )
    @action(detail=True, methods=["post"])
    def heartbeat(self, request: Request, pk: str) -> Response:
        body = HeartbeatSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        task = services.task_heartbeat(task_id=self._task_id(), proof=_proof(request, data), **data)
        return self._render(task)

    @extend_schema(
        request=ReleaseSerializer, responses={200: TaskSerializer, 404: ERROR, 409: ERROR}
    )
    @action(detail=True, methods=["post"])
    def release(self, request: Request, pk: str) -> Response:
        """Hand a leased task back to the queue without spending its attempt (a runner that
        is shutting down)."""
        body = ReleaseSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        task = services.task_hand_back(
            task_id=self._task_id(), actor=_actor(request), proof=_proof(request, data), **data
        )
        return self._render(task)

    @extend_schema(request=None, responses={200: TaskSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def cancel(self, request: Request, pk: str) -> Response:
        task = services.task_cancel(task_id=self._task_id(), actor=_actor(request))
        return self._render(task)

    @extend_schema(request=None, responses={200: TaskSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def requeue(self, request: Request, pk: str) -> Response:
        task = services.task_requeue(task_id=self._task_id(), actor=_actor(request))
        return self._render(task)

    @extend_schema(responses={200: TaskEventSerializer(many=True), 404: ERROR})
    @action(detail=True, methods=["get"], pagination_class=None, filterset_class=None)
    def events(self, request: Request, pk: str) -> Response:
        task = self.get_object()
        return Response(TaskEventSerializer(task.events.order_by("at", "id"), many=True).data)

    @extend_schema(
        parameters=[StatsQuerySerializer],
        responses={
            200: inline_serializer("StatsResponse", {"results": StatsRowSerializer(many=True)}),
            400: ERROR,
        },
    )
    @action(detail=False, methods=["get"], pagination_class=None, filterset_class=None)
    def stats(self, request: Request) -> Response:
        query = StatsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        rows = selectors.hourly_stats(queues=queue_scope(request), **query.validated_data)
        return Response({"results": StatsRowSerializer(rows, many=True).data})
