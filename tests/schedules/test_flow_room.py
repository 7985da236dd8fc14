"""The orchestrator does not overfill a rate-limited queue (DESIGN §9.4, issue 15 part 1)."""

from __future__ import annotations

import pytest

from schedules import services
from tasks import services as task_services
from tasks.models import Task, TaskStatus
from tests.schedules.helpers import tick

pytestmark = pytest.mark.django_db


def test_orchestrate__rate_limited_queue_gets_one_window_of_work() -> None:
    task_services.scheduler_create(id="rated", rate_limit="5/m")
    for _ in range(20):
        services.schedule_create(scheduler_id="rated", interval_seconds=60)

    assert tick("rated") == 5
    assert tick("rated") == 0  # five are QUEUED: a full window's worth
    assert len(task_services.task_pop(scheduler_id="rated", limit=3)) == 3
    assert tick("rated") == 3
    assert Task.objects.filter(status=TaskStatus.QUEUED).count() == 5
