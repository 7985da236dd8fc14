"""One of everything, for the API-wide tests: every route has a real object to hit."""

from __future__ import annotations

from typing import Any

import pytest

from pilots import services as pilot_services
from pilots.models import CEStatus, ComputeElement, PilotSubmission, VirtualOrganisation
from schedules import services as schedule_services
from schedules.models import Schedule
from tasks import services
from tasks.retry import RetrySpec
from tests.tasks.helpers import snapshot as task_snapshot


@pytest.fixture
def world(db: None) -> dict[str, str]:
    """Queues `boefje` (three tasks: QUEUED, DISPATCHED, DEAD) and `spare` (bounded, empty);
    an ACTIVE cron schedule and a PAUSED interval one; VO `lhcb`; CEs `ce-a` (ACTIVE, serves
    lhcb, one pilot), `ce-b` (no pilots) and `ce-c` (DRAINING). Returns the ids."""
    services.scheduler_create(id="boefje", retry_jitter=False)
    services.scheduler_create(id="spare", max_queue_size=2)
    queued = services.task_push(scheduler_id="boefje", data={"k": "queued"}, hash="h-queued")
    services.task_push(scheduler_id="boefje", data={"k": "dispatched"})
    [dispatched] = services.task_pop(scheduler_id="boefje", filters={"k": "dispatched"})
    failed = services.task_push(scheduler_id="boefje", data={"k": "failed"})
    services.task_pop(scheduler_id="boefje", filters={"k": "failed"})
    services.task_fail(task_id=failed.id, retry=RetrySpec(policy="none", dead_letter=True))
    schedule = schedule_services.schedule_create(
        scheduler_id="boefje", cron="*/5 * * * *", timezone="Europe/Amsterdam", hash="every5"
    )
    paused = schedule_services.schedule_create(scheduler_id="spare", interval_seconds=60)
    schedule_services.schedule_pause(schedule_id=paused.id)
    vo = VirtualOrganisation.objects.create(name="lhcb")
    ce = ComputeElement.objects.create(name="ce-a", capacity=3, reliability=1.0)
    ce.vos.set([vo])
    ComputeElement.objects.create(name="ce-b", capacity=1, reliability=1.0)
    ComputeElement.objects.create(name="ce-c", capacity=1, status=CEStatus.DRAINING)
    pilot = pilot_services.pilot_submit(ce_name="ce-a", vo_name="lhcb")
    return {
        "queued": str(queued.id),
        "dispatched": str(dispatched.id),
        "token": dispatched.lease_token,
        "failed": str(failed.id),
        "schedule": str(schedule.id),
        "paused_schedule": str(paused.id),
        "pilot": str(pilot.id),
    }


def snapshot() -> tuple[Any, ...]:
    """Every row a refused request must leave as it was."""
    return (
        *task_snapshot(),
        list(Schedule.objects.order_by("id").values()),
        list(VirtualOrganisation.objects.order_by("id").values()),
        list(ComputeElement.objects.order_by("id").values()),
        list(ComputeElement.vos.through.objects.order_by("id").values()),
        list(PilotSubmission.objects.order_by("id").values()),
    )
