"""Flow control through 2 real Celery workers (DESIGN §9.4, issue 15 part 7): dispatch holds
a queue's concurrency limit per key and its rate in every window, and fair share serves
every value. The periodic dispatcher's rounds are run by the test (`beat`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tasks import services
from tasks.models import Task, TaskEvent, TaskStatus
from tests.e2e.conftest import beat, wait_for

pytestmark = pytest.mark.e2e


def _all_completed(scheduler_id: str, count: int) -> bool:
    beat()
    statuses = Counter(
        Task.objects.filter(scheduler_id=scheduler_id).values_list("status", flat=True)
    )
    return statuses == {TaskStatus.COMPLETED: count}


def _most_active_at_once(scheduler_id: str) -> dict[str, int]:
    """Per concurrency value, the most attempts ever between hand-out and end (the events)."""
    events = TaskEvent.objects.filter(task__scheduler_id=scheduler_id).values_list(
        "task__concurrency_value", "to_status", "at"
    )
    changes: dict[str, list[tuple[Any, int]]] = {}
    for value, to_status, at in events:
        step = {TaskStatus.DISPATCHED: 1, TaskStatus.COMPLETED: -1}.get(to_status)
        if step:
            changes.setdefault(value, []).append((at, step))
    most: dict[str, int] = {}
    for value, steps in changes.items():
        level = 0
        for _, step in sorted(steps):
            level += step
            most[value] = max(most.get(value, 0), level)
    return most


def test_dispatch__two_workers_never_pass_the_concurrency_limit(start_worker: Any) -> None:
    services.scheduler_create(
        id="per-org",
        kind="celery",
        handler="demo.sleep",
        dispatch_threshold=10,
        concurrency_key="org.id",
        concurrency_limit=2,
        paused=True,
    )
    for n in range(24):
        services.task_push(scheduler_id="per-org", data={"org": {"id": n % 4}, "seconds": 0.2})
    start_worker("w1", pool="prefork", concurrency=3)
    start_worker("w2", pool="prefork", concurrency=3)
    # The first round hands out 2 per org (8 of the threshold's 10): each limit is reached.
    services.scheduler_set_paused(scheduler_id="per-org", paused=False)

    wait_for(lambda: _all_completed("per-org", 24), timeout=90, message="24 completed")
    assert _most_active_at_once("per-org") == {"0": 2, "1": 2, "2": 2, "3": 2}


def test_dispatch__two_workers_never_pass_the_rate(start_worker: Any) -> None:
    services.scheduler_create(
        id="rated", kind="celery", handler="demo.echo", dispatch_threshold=20, rate_limit="10/s"
    )
    start_worker("w1")
    start_worker("w2")

    for n in range(40):
        services.task_push(scheduler_id="rated", data={"n": n})

    wait_for(lambda: _all_completed("rated", 40), timeout=90, message="40 completed")
    times = sorted(
        TaskEvent.objects.filter(
            task__scheduler_id="rated", to_status=TaskStatus.DISPATCHED
        ).values_list("at", flat=True)
    )
    assert len(times) == 40
    for start, at in enumerate(times):
        inside = [t for t in times[start : start + 11] if (t - at).total_seconds() < 1]
        assert len(inside) <= 10, f"{len(inside)} dispatches in the second from {at}"


def test_dispatch__two_workers_serve_every_fair_value(start_worker: Any) -> None:
    services.scheduler_create(
        id="fair", kind="celery", handler="demo.echo", dispatch_threshold=2, fair_key="org",
        paused=True,
    )  # fmt: skip
    for _ in range(60):
        services.task_push(scheduler_id="fair", data={"org": "big"}, priority=0)
    for org in range(5):
        services.task_push(scheduler_id="fair", data={"org": f"small-{org}"}, priority=9)
    services.scheduler_set_paused(scheduler_id="fair", paused=False)
    start_worker("w1")
    start_worker("w2")

    wait_for(lambda: _all_completed("fair", 65), timeout=90, message="65 completed")
    order = (
        TaskEvent.objects.filter(task__scheduler_id="fair", to_status=TaskStatus.DISPATCHED)
        .order_by("at", "id")
        .values_list("task__fair_value", flat=True)
    )
    assert len(set(order[:6])) == 6  # every value within the first 6 dispatches
