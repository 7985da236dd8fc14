"""Fixtures of the schedules tests: a frozen clock and a schedule factory through the services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from time_machine import TimeMachineFixture

from schedules import services as schedule_services
from schedules.models import Schedule
from tasks.models import Scheduler
from tests.schedules.helpers import T0


@pytest.fixture
def clock(time_machine: TimeMachineFixture) -> TimeMachineFixture:
    """Time frozen at T0; move it with clock.move_to(dt, tick=False) or clock.shift(delta)."""
    time_machine.move_to(T0, tick=False)
    return time_machine


@pytest.fixture
def make_schedule(scheduler: Scheduler) -> Callable[..., Schedule]:
    """Create a schedule through schedule_create (default: the "boefje" queue, every minute)."""

    def make(**fields: Any) -> Schedule:
        fields.setdefault("scheduler_id", scheduler.id)
        if not {"cron", "interval_seconds", "run_at"} & set(fields):
            fields["interval_seconds"] = 60
        return schedule_services.schedule_create(**fields)

    return make
