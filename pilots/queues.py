"""The pilot cycles' celery queues (created on migrate) and how a cycle is started."""

from __future__ import annotations

import logging
from typing import Any

from django.db.models import Q

from pilots import services
from pilots.models import ACTIVE_PILOT_STATUSES, VirtualOrganisation
from tasks import services as task_services
from tasks.exceptions import DuplicateTask, QueueFull
from tasks.models import Scheduler

logger = logging.getLogger(__name__)

# cycle -> (queue, handler, VO-aware)
CYCLES: dict[str, tuple[str, str, bool]] = {
    "submit_pilots": (services.SUBMIT_PILOTS_QUEUE, "pilots.submit_pilots", True),
    "check_pilots": (services.CHECK_PILOTS_QUEUE, "pilots.check_pilots", True),
    "pilot_report": (services.REPORT_QUEUE, "pilots.pilot_report", False),
}
QUEUES = [
    *((queue, handler) for queue, handler, _ in CYCLES.values()),
    (services.SUBMIT_ONE_QUEUE, "pilots.submit_pilot"),
]


def ensure_queues(**_: Any) -> None:
    """Create the cycles' queues, marked `system` so that no one can delete them (the cycles
    would fail every 30-60 s); queues made before the flag existed are marked here too."""
    for queue_id, handler in QUEUES:
        if not Scheduler.objects.filter(id=queue_id).exists():
            task_services.scheduler_create(
                id=queue_id,
                kind="celery",
                handler=handler,
                description=f"Pilots: {handler} (system queue)",
                dispatch_threshold=20,
                lease_seconds=120,
                system=True,
            )
    Scheduler.objects.filter(id__in=[queue_id for queue_id, _ in QUEUES], system=False).update(
        system=True
    )


def start_cycle(cycle: str) -> list[str]:
    """Queue the cycle's tasks, one per enabled VO (check_pilots: also per disabled VO that
    still has active pilots) or one; a VO whose previous run is still active is skipped."""
    queue_id, _, vo_aware = CYCLES[cycle]
    vos = VirtualOrganisation.objects.filter(enabled=True)
    if cycle == "check_pilots":
        # A disabled VO's pilots hold their CE slots until they end: keep checking them.
        active = Q(pilots__status__in=list(ACTIVE_PILOT_STATUSES))
        vos = VirtualOrganisation.objects.filter(Q(enabled=True) | active).distinct()
    targets = list(vos.values_list("name", flat=True)) if vo_aware else [""]
    queued = []
    for vo in targets:
        data = {"vo": vo} if vo_aware else {}
        try:
            task_services.task_push(
                scheduler_id=queue_id,
                data=data,
                hash=f"{cycle}:{vo}" if vo else cycle,
                actor="beat",
            )
            queued.append(vo or cycle)
        except DuplicateTask:
            logger.info("%s for %s still running: skipped this cycle", cycle, vo or "all")
        except QueueFull:
            # An operator bounded the queue (max_queue_size): the VOs already queued keep their
            # turn, and the beat job ends without an error that would repeat every cycle.
            logger.warning(
                "%s: queue %s is full; skipped %s this cycle", cycle, queue_id, vo or "all"
            )
    return queued
