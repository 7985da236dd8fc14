"""The database gauges of /metrics: each a grouped count, one sample per label value."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from pilots.models import PilotStatus
from scheduler_site.metrics import DatabaseCollector
from schedules import services as schedule_services
from tasks import services
from tests.pilots.helpers import make_ce, make_pilot
from tests.tasks.helpers import SYSTEM_QUEUES, T0


def _samples(name: str) -> dict[tuple[str, ...], float]:
    [family] = [f for f in DatabaseCollector().collect() if f.name == name]
    return {
        tuple(s.labels.values()): s.value
        for s in family.samples
        if s.labels.get("scheduler") not in SYSTEM_QUEUES
    }


@pytest.mark.django_db
@time_machine.travel(T0, tick=False)
def test_database_collector__counts_tasks_depth_due_schedules_and_pilots() -> None:
    services.scheduler_create(id="boefje", kind="pull")
    for n in range(3):
        services.task_push(scheduler_id="boefje", data={"n": n})
    services.task_push(scheduler_id="boefje", data={"later": 1}, not_before=T0 + timedelta(hours=1))
    services.task_pop(scheduler_id="boefje", limit=1, worker="w")
    schedule_services.schedule_create(scheduler_id="boefje", interval_seconds=60, data={"s": 1})
    ce = make_ce("ce-a")
    make_pilot(ce, status=PilotStatus.RUNNING)
    make_pilot(ce, status=PilotStatus.RUNNING)
    make_pilot(ce, status=PilotStatus.FAILED)

    assert _samples("scheduler_tasks") == {("boefje", "QUEUED"): 3, ("boefje", "DISPATCHED"): 1}
    assert _samples("scheduler_queue_depth") == {("boefje",): 2}
    assert _samples("scheduler_pilots") == {("ce-a", "RUNNING"): 2, ("ce-a", "FAILED"): 1}
    with time_machine.travel(timezone.now() + timedelta(minutes=2), tick=False):
        assert _samples("scheduler_due_schedules") == {("boefje",): 1}
