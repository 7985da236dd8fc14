"""Reads of the pilots app that are more than a filter: a CE by name (404 if none), active
pilots per CE."""

from __future__ import annotations

from django.db.models import Count, Q

from pilots.exceptions import PilotNotFound
from pilots.models import ACTIVE_PILOT_STATUSES, ComputeElement


def ce_get(name: str, *, for_update: bool = False) -> ComputeElement:
    queryset = ComputeElement.objects.select_for_update() if for_update else ComputeElement.objects
    ce = queryset.filter(name=name).first()
    if ce is None:
        raise PilotNotFound(f"Compute element {name!r} does not exist.")
    return ce


def active_pilots_by_ce() -> dict[int, int]:
    """CE id -> its SUBMITTED and RUNNING pilots, all VOs counted (one grouped query)."""
    active = ComputeElement.objects.annotate(
        n=Count("pilots", filter=Q(pilots__status__in=list(ACTIVE_PILOT_STATUSES)))
    ).values_list("id", "n")
    return dict(active)
