"""Shared arrangement helpers of the pilots tests (plain functions, usable in child processes)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pilots.models import (
    ACTIVE_PILOT_STATUSES,
    ComputeElement,
    PilotStatus,
    PilotSubmission,
    VirtualOrganisation,
)

P = PilotStatus
# A Tuesday, 10:05:00 UTC.
T0 = datetime(2030, 1, 1, 10, 5, tzinfo=UTC)


def make_vo(name: str, *, enabled: bool = True) -> VirtualOrganisation:
    return VirtualOrganisation.objects.get_or_create(name=name, defaults={"enabled": enabled})[0]


def make_ce(
    name: str = "ce-a",
    *,
    capacity: int = 2,
    reliability: float = 1.0,
    vos: Iterable[str] = ("lhcb",),
    **fields: Any,
) -> ComputeElement:
    """A simulated CE (reliability 1.0: every submission succeeds) serving the named VOs."""
    ce = ComputeElement.objects.create(
        name=name, capacity=capacity, reliability=reliability, **fields
    )
    ce.vos.set([make_vo(vo) for vo in vos])
    return ce


def make_pilot(ce: ComputeElement, vo: str = "lhcb", **fields: Any) -> PilotSubmission:
    """A pilot row written directly (no backend call): for counts and state tests."""
    return PilotSubmission.objects.create(ce=ce, vo=make_vo(vo), **fields)


def active_on(ce_name: str) -> int:
    return PilotSubmission.objects.filter(
        ce__name=ce_name, status__in=list(ACTIVE_PILOT_STATUSES)
    ).count()


def fresh(pilot: PilotSubmission) -> PilotSubmission:
    return PilotSubmission.objects.get(id=pilot.id)
