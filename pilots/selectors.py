"""Reads of the pilots app that are more than a filter: active pilots per CE."""

from __future__ import annotations

from django.db.models import Count, Q

from pilots.models import ACTIVE_PILOT_STATUSES, ComputeElement


def active_pilots_by_ce() -> dict[int, int]:
    """CE id -> its SUBMITTED and RUNNING pilots, all VOs counted (one grouped query)."""
    active = ComputeElement.objects.annotate(
        n=Count("pilots", filter=Q(pilots__status__in=list(ACTIVE_PILOT_STATUSES)))
    ).values_list("id", "n")
    return dict(active)
