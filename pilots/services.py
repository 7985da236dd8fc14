"""Writes for VOs, Compute Elements and pilots. A CE is never over-committed: a submission
reserves its slot by inserting the pilot while holding the CE's row (PostgreSQL: FOR UPDATE;
SQLite: the IMMEDIATE transaction), after counting the CE's active pilots of every VO."""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from pilots import selectors
from pilots.backends import SubmitError, backend_for
from pilots.exceptions import NoFreeSlot, PilotNotFound
from pilots.models import (
    ACTIVE_PILOT_STATUSES,
    CEStatus,
    ComputeElement,
    ComputeElementEvent,
    PilotEvent,
    PilotReport,
    PilotStatus,
    PilotSubmission,
    VirtualOrganisation,
)
from tasks import services as task_services
from tasks.exceptions import TransitionRefused
from tasks.models import ACTIVE_STATUSES, Task

logger = logging.getLogger(__name__)


def _get_ce(name: str, *, for_update: bool = False) -> ComputeElement:
    return selectors.ce_get(name, for_update=for_update)


def active_pilots(ce: ComputeElement) -> int:
    return ce.pilots.filter(status__in=list(ACTIVE_PILOT_STATUSES)).count()


def free_slots(ce: ComputeElement) -> int:
    return max(ce.capacity - active_pilots(ce), 0)


def ce_set_status(*, name: str, to_status: str, actor: str = "") -> ComputeElement:
    """drain / ban / activate, by compare-and-swap. Banning fails the CE's SUBMITTED pilots."""
    with transaction.atomic():
        ce = _get_ce(name, for_update=True)
        if ce.status == to_status:
            return ce
        if not ce.can_transition_to(to_status):
            raise TransitionRefused(
                f"Cannot move compute element {name} from {ce.status} to {to_status}.",
                current_status=ce.status,
            )
        now = timezone.now()
        ComputeElement.objects.filter(id=ce.id, status=ce.status).update(
            status=to_status, modified_at=now
        )
        ComputeElementEvent.objects.create(
            ce=ce, from_status=ce.status, to_status=to_status, at=now, actor=actor[:200]
        )
        if to_status == CEStatus.BANNED:
            _fail_submitted(ce, reason=f"CE {name} banned by {actor or 'an operator'}", at=now)
    logger.info("CE %s %s -> %s by %s", name, ce.status, to_status, actor)
    ce.refresh_from_db()
    return ce


def _fail_submitted(ce: ComputeElement, *, reason: str, at: datetime) -> None:
    """A banned CE's SUBMITTED pilots will never start: FAILED, each with its event."""
    pilots = list(
        PilotSubmission.objects.select_for_update()
        .filter(ce=ce, status=PilotStatus.SUBMITTED)
        .values_list("id", flat=True)
    )
    PilotSubmission.objects.filter(id__in=pilots, status=PilotStatus.SUBMITTED).update(
        status=PilotStatus.FAILED, finished_at=at, failure_reason=reason
    )
    PilotEvent.objects.bulk_create(
        PilotEvent(
            pilot_id=pilot_id,
            from_status=PilotStatus.SUBMITTED,
            to_status=PilotStatus.FAILED,
            at=at,
            note=reason,
        )
        for pilot_id in pilots
    )
    logger.info("CE %s banned: %d submitted pilots failed", ce.name, len(pilots))


# --- inventory: VOs and Compute Elements ---------------------------------------------------


def vo_create(*, name: str, enabled: bool = True) -> VirtualOrganisation:
    vo = VirtualOrganisation(name=name, enabled=enabled)
    vo.full_clean()
    vo.save(force_insert=True)
    return vo


def vo_update(*, vo: VirtualOrganisation, **fields: Any) -> VirtualOrganisation:
    for field, value in fields.items():
        setattr(vo, field, value)
    vo.full_clean()
    vo.save(update_fields=list(fields))
    return vo


def ce_create(
    *, name: str, vos: Sequence[VirtualOrganisation] = (), **fields: Any
) -> ComputeElement:
    with transaction.atomic():
        ce = ComputeElement(name=name, **fields)
        ce.full_clean()
        ce.save(force_insert=True)
        ce.vos.set(vos)
        ComputeElementEvent.objects.create(ce=ce, to_status=ce.status, note="created")
    return ce


def ce_update(
    *, ce: ComputeElement, vos: Sequence[VirtualOrganisation] | None = None, **fields: Any
) -> ComputeElement:
    """Capacity, reliability, backend and its settings, VOs; status moves by ce_set_status."""
    with transaction.atomic():
        for field, value in fields.items():
            setattr(ce, field, value)
        ce.modified_at = timezone.now()
        ce.full_clean()
        ce.save(update_fields=[*fields, "modified_at"])
        if vos is not None:
            ce.vos.set(vos)
    return ce


def ce_delete(*, name: str) -> None:
    """Only a CE with no pilots on record: their history must not go with it (409)."""
    with transaction.atomic():
        ce = _get_ce(name, for_update=True)
        if ce.pilots.exists():
            raise NoFreeSlot(
                f"Compute element {name} has pilots on record; ban or drain it instead."
            )
        ce.delete()


def pilot_submit(*, ce_name: str, vo_name: str, actor: str = "") -> PilotSubmission:
    """Reserve a slot and submit one pilot. Refused (409) when the CE is not ACTIVE, does not
    serve the VO, or has no free slot."""
    with transaction.atomic():
        ce = _get_ce(ce_name, for_update=True)
        vo = ce.vos.filter(name=vo_name).first()
        if ce.status != CEStatus.ACTIVE:
            raise NoFreeSlot(f"Compute element {ce_name} is {ce.status}: it takes no new pilots.")
        if vo is None or not vo.enabled:
            raise NoFreeSlot(f"Compute element {ce_name} does not serve an enabled VO {vo_name!r}.")
        active = active_pilots(ce)
        if active >= ce.capacity:
            raise NoFreeSlot(
                f"Compute element {ce_name} is full: {active} of {ce.capacity} slots in use."
            )
        pilot = PilotSubmission.objects.create(ce=ce, vo=vo)
        PilotEvent.objects.create(
            pilot=pilot, to_status=PilotStatus.SUBMITTED, actor=actor[:200], note="submitted"
        )
    # The slow call to the CE happens after the slot is committed, outside any lock of rows.
    try:
        external_id = backend_for(ce).submit(pilot)
    except SubmitError as exc:
        _move(pilot, PilotStatus.FAILED, failure_reason=f"submission failed: {exc}")
        logger.info(
            "pilot %s to %s for %s: submission failed (%s)", pilot.id, ce_name, vo_name, exc
        )
    else:
        PilotSubmission.objects.filter(id=pilot.id).update(external_id=external_id)
        logger.info("pilot %s submitted to %s for %s by %s", pilot.id, ce_name, vo_name, actor)
    pilot.refresh_from_db()
    return pilot


def _move(pilot: PilotSubmission, to_status: str, *, actor: str = "", **values: Any) -> bool:
    """Compare-and-swap a pilot's status, with its event; False when it changed meanwhile or
    may not move."""
    if not pilot.can_transition_to(to_status):
        return False
    now = timezone.now()
    stamps: dict[str, Any] = {"last_seen_at": now}
    if to_status == PilotStatus.RUNNING:
        stamps["started_at"] = now
    if to_status in {PilotStatus.DONE, PilotStatus.FAILED}:
        stamps["finished_at"] = now
    with transaction.atomic():
        moved = PilotSubmission.objects.filter(id=pilot.id, status=pilot.status).update(
            status=to_status, **stamps, **values
        )
        if moved:
            PilotEvent.objects.create(
                pilot_id=pilot.id,
                from_status=pilot.status,
                to_status=to_status,
                at=now,
                actor=actor[:200],
                note=values.get("failure_reason", ""),
            )
    return bool(moved)


def pilot_mark(
    *, pilot_id: uuid.UUID, to_status: str, reason: str = "", actor: str = ""
) -> PilotSubmission:
    """Move a pilot along its state machine (RUNNING, DONE, FAILED with a reason): the
    refreshed pilot, or TransitionRefused (409) when the move is not allowed from its status
    or it changed meanwhile."""
    pilot = PilotSubmission.objects.filter(id=pilot_id).first()
    if pilot is None:
        raise PilotNotFound(f"Pilot {pilot_id} does not exist.")
    values = {"failure_reason": reason} if to_status == PilotStatus.FAILED else {}
    if not _move(pilot, to_status, actor=actor, **values):
        current = PilotSubmission.objects.filter(id=pilot_id).values_list("status", flat=True)
        status = current.first() or ""
        raise TransitionRefused(
            f"Cannot move pilot {pilot_id} from {status} to {to_status}.", current_status=status
        )
    pilot.refresh_from_db()
    return pilot


def submit_pilots_for_vo(*, vo_name: str) -> dict[str, int]:
    """One submit_pilot task per free slot of every ACTIVE CE serving the VO (free slots count
    the pilots of all VOs, and submissions already queued for the CE)."""
    pushed: dict[str, int] = {}
    vo = VirtualOrganisation.objects.filter(name=vo_name, enabled=True).first()
    if vo is None:
        return pushed
    for ce in vo.compute_elements.filter(status=CEStatus.ACTIVE):
        pending = Task.objects.filter(
            scheduler_id=SUBMIT_ONE_QUEUE, status__in=list(ACTIVE_STATUSES), data__ce=ce.name
        ).count()
        for _ in range(max(free_slots(ce) - pending, 0)):
            task_services.task_push(
                scheduler_id=SUBMIT_ONE_QUEUE,
                data={"ce": ce.name, "vo": vo.name},
                actor="submit_pilots",
            )
            pushed[ce.name] = pushed.get(ce.name, 0) + 1
    return pushed


def check_pilots_for_vo(*, vo_name: str) -> dict[str, int]:
    """Advance the VO's active pilots from their CEs' news; no news for PILOT_LOST_AFTER_SECONDS
    means FAILED ("lost")."""
    moved: dict[str, int] = defaultdict(int)
    lost_before = timezone.now() - timedelta(seconds=settings.PILOT_LOST_AFTER_SECONDS)
    pilots = PilotSubmission.objects.filter(
        vo__name=vo_name, status__in=list(ACTIVE_PILOT_STATUSES)
    ).select_related("ce")
    by_ce: dict[int, list[PilotSubmission]] = defaultdict(list)
    for pilot in pilots:
        by_ce[pilot.ce_id].append(pilot)
    for group in by_ce.values():
        news = backend_for(group[0].ce).status([p for p in group if p.external_id])
        for pilot in group:
            item = news.get(pilot.external_id) if pilot.external_id else None
            if item is not None:
                if item.status == pilot.status:
                    PilotSubmission.objects.filter(id=pilot.id).update(last_seen_at=timezone.now())
                elif _advance(pilot, item.status, item.reason):
                    moved[item.status] += 1
            elif pilot.last_seen_at < lost_before and _move(
                pilot, PilotStatus.FAILED, failure_reason="lost: no news from the CE"
            ):
                moved["lost"] += 1
    return dict(moved)


def _advance(pilot: PilotSubmission, to_status: str, reason: str) -> bool:
    if pilot.status == PilotStatus.SUBMITTED and to_status in {PilotStatus.DONE}:
        # It ran and finished between two checks: record both steps.
        if not _move(pilot, PilotStatus.RUNNING):
            return False
        pilot.status = PilotStatus.RUNNING
    return _move(pilot, to_status, failure_reason=reason) if reason else _move(pilot, to_status)


def pilot_counts() -> dict[str, Any]:
    """Pilots per status, and per status within each CE and VO."""
    by_status: dict[str, int] = dict.fromkeys(PilotStatus.values, 0)
    by_ce: dict[str, dict[str, int]] = defaultdict(dict)
    by_vo: dict[str, dict[str, int]] = defaultdict(dict)
    rows = PilotSubmission.objects.values("ce__name", "vo__name", "status").annotate(n=Count("id"))
    for row in rows.order_by():
        by_status[row["status"]] += row["n"]
        ce_counts, vo_counts = by_ce[row["ce__name"]], by_vo[row["vo__name"]]
        ce_counts[row["status"]] = ce_counts.get(row["status"], 0) + row["n"]
        vo_counts[row["status"]] = vo_counts.get(row["status"], 0) + row["n"]
    return {"by_status": by_status, "by_ce": dict(by_ce), "by_vo": dict(by_vo)}


def pilot_report_create() -> PilotReport:
    report = PilotReport.objects.create(**pilot_counts())
    summary = ", ".join(f"{k}={v}" for k, v in report.by_status.items())
    logger.info("pilot report %s: %s", report.id, summary)
    return report


SUBMIT_PILOTS_QUEUE = "pilots-submit-pilots"
SUBMIT_ONE_QUEUE = "pilots-submit-pilot"
CHECK_PILOTS_QUEUE = "pilots-check-pilots"
REPORT_QUEUE = "pilots-pilot-report"
