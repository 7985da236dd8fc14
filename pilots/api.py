"""REST views for VOs, Compute Elements and pilots: validate, call one service, render."""

from __future__ import annotations

from typing import Any

import django_filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from pilots import selectors, services
from pilots.models import (
    CEMove,
    ComputeElement,
    PilotStatus,
    PilotSubmission,
    VirtualOrganisation,
)
from pilots.serializers import (
    ComputeElementSerializer,
    ComputeElementUpdateSerializer,
    PilotSerializer,
    SubmitSerializer,
    SummarySerializer,
    VOSerializer,
)
from scheduler_site.api_helpers import ERROR, UUID_PATTERN, actor
from scheduler_site.api_input import StrictBodyMixin

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"


class VOViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    queryset = VirtualOrganisation.objects.all()
    serializer_class = VOSerializer
    lookup_field = "name"
    lookup_value_regex = NAME_PATTERN
    http_method_names = ["get", "post", "patch", "head", "options"]

    def perform_create(self, serializer: VOSerializer) -> None:
        serializer.instance = services.vo_create(**serializer.validated_data)

    def perform_update(self, serializer: VOSerializer) -> None:
        serializer.instance = services.vo_update(
            vo=serializer.instance, **serializer.validated_data
        )


@extend_schema_view(
    partial_update=extend_schema(request=ComputeElementUpdateSerializer),
    destroy=extend_schema(responses={204: None, 409: ERROR}),  # pilots on record
)
class ComputeElementViewSet(StrictBodyMixin, viewsets.ModelViewSet):
    queryset = ComputeElement.objects.prefetch_related("vos")
    serializer_class = ComputeElementSerializer
    # No PUT: the README's API has PATCH; a PUT would need the id (or name, or scheduler) that
    # an update cannot change.
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    lookup_field = "name"
    lookup_value_regex = NAME_PATTERN
    action_permissions = {
        "drain": ["pilots.change_computeelement"],
        "ban": ["pilots.change_computeelement"],
        "activate": ["pilots.change_computeelement"],
        "submit": ["pilots.add_pilotsubmission"],
    }

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        context["active"] = selectors.active_pilots_by_ce()
        return context

    def perform_create(self, serializer: ComputeElementSerializer) -> None:
        serializer.instance = services.ce_create(**serializer.validated_data)

    def perform_update(self, serializer: ComputeElementSerializer) -> None:
        serializer.instance = services.ce_update(
            ce=serializer.instance, **serializer.validated_data
        )

    def perform_destroy(self, instance: ComputeElement) -> None:
        services.ce_delete(name=instance.name)

    def _set_status(self, request: Request, name: str, move: CEMove) -> Response:
        ce = move(selectors.ce_get(name), actor=actor(request))
        return Response(self.get_serializer(ce).data)

    @extend_schema(request=None, responses={200: ComputeElementSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def drain(self, request: Request, name: str) -> Response:
        return self._set_status(request, name, ComputeElement.drain)

    @extend_schema(request=None, responses={200: ComputeElementSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def ban(self, request: Request, name: str) -> Response:
        return self._set_status(request, name, ComputeElement.ban)

    @extend_schema(request=None, responses={200: ComputeElementSerializer, 404: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"], takes_body=False)
    def activate(self, request: Request, name: str) -> Response:
        return self._set_status(request, name, ComputeElement.activate)

    @extend_schema(
        request=SubmitSerializer,
        responses={201: PilotSerializer, 400: ERROR, 404: ERROR, 409: ERROR},
    )
    @action(detail=True, methods=["post"])
    def submit(self, request: Request, name: str) -> Response:
        body = SubmitSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        pilot = services.pilot_submit(
            ce_name=name, vo_name=body.validated_data["vo"], actor=actor(request)
        )
        return Response(PilotSerializer(pilot).data, status=status.HTTP_201_CREATED)


class PilotFilter(django_filters.FilterSet):
    ce = django_filters.CharFilter(field_name="ce__name")
    vo = django_filters.CharFilter(field_name="vo__name")
    status = django_filters.MultipleChoiceFilter(choices=PilotStatus.choices)
    submitted_after = django_filters.IsoDateTimeFilter(field_name="submitted_at", lookup_expr="gte")
    submitted_before = django_filters.IsoDateTimeFilter(field_name="submitted_at", lookup_expr="lt")

    class Meta:
        model = PilotSubmission
        fields = ["ce", "vo", "status"]


class PilotViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = PilotSubmission.objects.select_related("ce", "vo")
    serializer_class = PilotSerializer
    filterset_class = PilotFilter
    lookup_value_regex = UUID_PATTERN
    action_permissions = {"summary": ["pilots.view_pilotsubmission"]}

    @extend_schema(responses={200: SummarySerializer})
    @action(detail=False, methods=["get"], pagination_class=None, filterset_class=None)
    def summary(self, request: Request) -> Response:
        return Response(services.pilot_counts())
