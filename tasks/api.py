"""REST views for schedulers and tasks: validate, call one service, render."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from django.http import HttpResponseBase
from drf_spectacular.utils import (
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from scheduler_site.api_helpers import ERROR, UUID_PATTERN, actor
from scheduler_site.api_input import (
    CursorPagination,
    StrictBodyMixin,
    validated_body,
)
from scheduler_site.permissions import (
    ModelActionPermissions,
    QueueScopePermission,
    TaskScopePermission,
    queue_scope,
)
from tasks import batches, selectors, services, workers
from tasks.filters import TaskFilter, WorkerFilter
from tasks.leases import LeaseProof
from tasks.models import Scheduler, Task, Worker
from tasks.serializers import (
    BatchReportSerializer,
    HeartbeatSerializer,
    PoppedTaskSerializer,
    PopSerializer,
    PushOutcomeSerializer,
    ReleaseSerializer,
    ReportOutcomeSerializer,
    SchedulerSerializer,
    SchedulerUpdateSerializer,
    SeriesQuerySerializer,
    SeriesSerializer,
    StatsQuerySerializer,
    StatsRowSerializer,
    TaskEventSerializer,
    TaskPushSerializer,
    TaskReportSerializer,
    TaskSerializer,
    WorkerSerializer,
    push_body,
    render_tasks,
    report_body,
)

POP_RESPONSE = inline_serializer("PopResponse", {"results": PoppedTaskSerializer(many=True)})
RUNNER_PERMS = ["tasks.report_task"]
OPERATOR_PERM = "tasks.change_task"


_AFTER_ANSWER = "_after_answer"


def after_answer(request: Any, note: Callable[[], None]) -> None:
    """Run `note` once the answer has been sent: a runner's liveness note (a write every few
    seconds, a lock and a lookup on every call) is no part of what the runner waits for. The
    WSGI server closes the response after writing it, and Django runs the response's closers
    then, before its request_finished (the request's database connection is still open). A
    note runs whether the call succeeded or was refused, as it did when it ran in line."""
    django_request = getattr(request, "_request", request)  # a DRF Request wraps Django's
    vars(django_request).setdefault(_AFTER_ANSWER, []).append(note)


def with_notes(request: Any, response: HttpResponseBase) -> HttpResponseBase:
    """The response, closing with the notes `after_answer` left on the request."""
    django_request = getattr(request, "_request", request)
    # Django's own list of what close() runs (its FileResponse closes files with it).
    response._resource_closers.extend(vars(django_request).pop(_AFTER_ANSWER, ()))
    return response


class AfterAnswerMixin:
    """For viewsets: every answer carries the request's `after_answer` notes."""

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        return with_notes(request, response)


def _is_operator(request: Any) -> bool:
    # Asked twice by a report (its proof, its rendering): one permission check a request.
    known = getattr(request, "_is_operator", None)
    if known is None:
        known = request._is_operator = request.user.has_perm(OPERATOR_PERM)
    return known


def _proof(request: Any, body: dict[str, Any]) -> LeaseProof:
    """The caller's claim to a task's lease: the token in the body (taken out of it), or, for
    an operator, none at all (an override the event records). A holder's call is also how its
    runner is seen alive (GET /api/workers/)."""
    token = body.pop("lease_token", None)
    if token:
        after_answer(request, partial(workers.runner_seen, request))
    return LeaseProof(token=token, operator=_is_operator(request))


def _push_result(outcome: batches.PushOutcome) -> dict[str, Any]:
    if outcome.task is not None:
        return {"status": outcome.status, "task": render_tasks([outcome.task])[0]}
    if outcome.existing_id is not None:
        return {"status": outcome.status, "existing_id": str(outcome.existing_id)}
    if outcome.errors is not None:
        return {"status": outcome.status, "errors": outcome.errors}
    return {"status": outcome.status}


def _report_result(outcome: batches.ReportOutcome) -> dict[str, Any]:
    result: dict[str, Any] = {"id": str(outcome.id), "status": outcome.status}
    if outcome.task is not None:
        result["task"] = render_tasks([outcome.task])[0]
    if outcome.detail:
        result["detail"] = outcome.detail
    return result


# The hot endpoints' work, shared by their DRF actions below and their lean views
# (tasks/api_lean.py): each takes the request (a DRF or a Django one, authenticated), the
# URL's kwargs and the parsed body, and returns (HTTP status, payload).
Answer = tuple[int, Any]


def _response(answer: Answer) -> Response:
    code, payload = answer
    return Response(payload, status=code)


def pop_answer(request: Any, kwargs: dict[str, Any], data: Any) -> Answer:
    pk = kwargs["pk"]
    body = validated_body(PopSerializer, data)
    tasks = services.task_pop(scheduler_id=pk, worker=actor(request), **body)
    after_answer(request, partial(workers.runner_seen, request, scheduler_id=pk))
    # The pop's answer is the one place a runner learns its lease tokens.
    return 200, {"results": render_tasks(tasks, popped=True)}


def push_answer(request: Any, kwargs: dict[str, Any], data: Any) -> Answer:
    if isinstance(data, list):
        return 200, {"results": _push_many(request, kwargs["pk"], data)}
    body, errors = push_body(data)
    if errors is not None:
        raise ValidationError(errors)
    task = services.task_push(scheduler_id=kwargs["pk"], actor=actor(request), **body)
    return status.HTTP_201_CREATED, render_tasks([task])[0]


def _push_many(request: Any, pk: str, items: list[Any]) -> list[dict[str, Any]]:
    if not 1 <= len(items) <= batches.BATCH_MAX:
        message = f"A batch push takes 1 to {batches.BATCH_MAX} task objects."
        raise ValidationError({"non_field_errors": [message]})
    bodies = [push_body(item) for item in items]
    valid = [body for body, errors in bodies if errors is None]
    outcomes = iter(batches.task_push_many(scheduler_id=pk, pushes=valid, actor=actor(request)))
    return [
        _push_result(next(outcomes)) if errors is None else {"status": 400, "errors": errors}
        for _body, errors in bodies
    ]


def report_answer(request: Any, kwargs: dict[str, Any], data: Any) -> Answer:
    body = report_body(data)
    task = services.task_report(
        task_id=uuid.UUID(kwargs["pk"]), actor=actor(request), proof=_proof(request, body), **body
    )
    return 200, render_tasks([task], show_lease_token=_is_operator(request))[0]


def batch_report_answer(request: Any, kwargs: dict[str, Any], data: Any) -> Answer:
    body = validated_body(BatchReportSerializer, data)
    after_answer(request, partial(workers.runner_seen, request))
    outcomes = batches.tasks_report_many(
        reports=body["reports"],
        actor=actor(request),
        operator=_is_operator(request),
        queues=queue_scope(request),
    )
    return 200, {"results": [_report_result(outcome) for outcome in outcomes]}


PUSH_REQUEST = PolymorphicProxySerializer(
    component_name="PushOneOrMany",
    serializers=[
        TaskPushSerializer,
        TaskPushSerializer(many=True, min_length=1, max_length=batches.BATCH_MAX),
    ],
    resource_type_field_name=None,
    many=False,
)
PUSH_BATCH_RESPONSE = inline_serializer(
    "PushBatchResponse", {"results": PushOutcomeSerializer(many=True)}
)


class TaskCursorPagination(CursorPagination):
    # Cursor paging needs no COUNT(*), so listing stays cheap on a table of millions.
    ordering = ("-created_at", "-id")


@extend_schema_view(
    partial_update=extend_schema(request=SchedulerUpdateSerializer),
    destroy=extend_schema(responses={204: None, 409: ERROR}),  # while tasks are active
)
class SchedulerViewSet(AfterAnswerMixin, StrictBodyMixin, viewsets.ModelViewSet):
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
            scheduler_id=pk, paused=True, actor=actor(request)
        )
        return Response(self.get_serializer(scheduler).data)

    @extend_schema(request=None, responses={200: SchedulerSerializer, 404: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def resume(self, request: Request, pk: str) -> Response:
        scheduler = services.scheduler_set_paused(
            scheduler_id=pk, paused=False, actor=actor(request)
        )
        return Response(self.get_serializer(scheduler).data)

    @extend_schema(
        request=PUSH_REQUEST,
        responses={
            201: TaskSerializer,
            200: PUSH_BATCH_RESPONSE,
            400: ERROR,
            404: ERROR,
            409: ERROR,
            429: ERROR,
        },
        description="One task object → 201 with the task; an array of up to "
        f"{batches.BATCH_MAX} → 200 with one outcome per item, in order, in one transaction.",
    )
    @action(detail=True, methods=["post"])
    def push(self, request: Request, pk: str) -> Response:
        return _response(push_answer(request, {"pk": pk}, request.data))

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
        return _response(pop_answer(request, {"pk": pk}, request.data))


class TaskViewSet(
    AfterAnswerMixin,
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
        "report": RUNNER_PERMS,
        "heartbeat": RUNNER_PERMS,
        "release": RUNNER_PERMS,
        "cancel": ["tasks.change_task"],
        "requeue": ["tasks.change_task"],
        "events": ["tasks.view_task"],
        "stats": ["tasks.view_task"],
        "series": ["tasks.view_task"],
    }

    def get_queryset(self) -> Any:
        return selectors.task_list(queues=queue_scope(self.request))

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        context["show_lease_token"] = _is_operator(self.request)
        return context

    def _render(self, task: Task) -> Response:
        return Response(render_tasks([task], show_lease_token=_is_operator(self.request))[0])

    def _task_id(self) -> uuid.UUID:
        return uuid.UUID(self.kwargs["pk"])

    @extend_schema(
        request=TaskReportSerializer,
        responses={200: TaskSerializer, 400: ERROR, 404: ERROR, 409: ERROR},
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        return _response(report_answer(request, {"pk": pk}, request.data))

    @extend_schema(
        request=BatchReportSerializer,
        responses={
            200: inline_serializer(
                "BatchReportResponse", {"results": ReportOutcomeSerializer(many=True)}
            ),
            400: ERROR,
        },
        description=f"Up to {batches.BATCH_MAX} reports, each applied as its own PATCH would "
        "be (each with its lease_token): one outcome per report, in order (200, 404, 409).",
    )
    @action(detail=False, methods=["post"])
    def report(self, request: Request) -> Response:
        return _response(batch_report_answer(request, {}, request.data))

    @extend_schema(
        request=HeartbeatSerializer, responses={200: TaskSerializer, 404: ERROR, 409: ERROR}
    )
    @action(detail=True, methods=["post"])
    def heartbeat(self, request: Request, pk: str) -> Response:
        data = dict(validated_body(HeartbeatSerializer, request.data))
        task = services.task_heartbeat(task_id=self._task_id(), proof=_proof(request, data), **data)
        return self._render(task)

    @extend_schema(
        request=ReleaseSerializer, responses={200: TaskSerializer, 404: ERROR, 409: ERROR}
    )
    @action(detail=True, methods=["post"])
    def release(self, request: Request, pk: str) -> Response:
        """Hand a leased task back to the queue without spending its attempt (a runner that
        is shutting down)."""
        data = dict(validated_body(ReleaseSerializer, request.data))
        task = services.task_hand_back(
            task_id=self._task_id(), actor=actor(request), proof=_proof(request, data), **data
        )
        return self._render(task)

    @extend_schema(request=None, responses={200: TaskSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def cancel(self, request: Request, pk: str) -> Response:
        task = selectors.get_task(self._task_id()).cancel(actor=actor(request))
        return self._render(task)

    @extend_schema(request=None, responses={200: TaskSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def requeue(self, request: Request, pk: str) -> Response:
        task = selectors.get_task(self._task_id()).requeue(actor=actor(request))
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

    @extend_schema(
        parameters=[SeriesQuerySerializer], responses={200: SeriesSerializer, 400: ERROR}
    )
    @action(detail=False, methods=["get"], pagination_class=None, filterset_class=None)
    def series(self, request: Request) -> Response:
        """Throughput and queue wait (p50/p95) over a range, per point, for one queue or all:
        what the dashboard charts. Read from the per-minute rollup (a minute or so behind)."""
        query = SeriesQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        data = selectors.queue_series(queues=queue_scope(request), **query.validated_data)
        return Response(SeriesSerializer(data).data)


class WorkerViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Celery workers, pull runners and beat as they last reported themselves (live, stopped
    or lost), with the queues they serve and the tasks they hold."""

    queryset = Worker.objects.all()
    serializer_class = WorkerSerializer
    filterset_class = WorkerFilter

    def get_queryset(self) -> Any:
        return selectors.worker_list()
