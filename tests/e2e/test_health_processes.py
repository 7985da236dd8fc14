"""Health from real processes (DESIGN 9.6): a Celery worker registers when it starts, beats,
is marked stopped when it shuts down and turns lost when killed; beat registers when it sends;
GET /api/health/ goes from ok to down when the worker stops."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from scheduler_site.health import system_health
from tasks import selectors
from tasks.models import Worker, WorkerKind
from tests.support.processes import BeatProcess, WorkerProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def _node(worker: WorkerProcess) -> Worker | None:
    return Worker.objects.filter(kind=WorkerKind.CELERY, name__startswith=f"{worker.name}@").first()


def test_worker__registers_beats_and_is_marked_stopped_on_shutdown(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("reg")
    row = wait_for(lambda: _node(worker), message="the worker's row")
    # Without -Q: Celery's default queue and the system queue (the periodic jobs').
    assert (row.pid, row.queues, row.stopped_at) == (worker.process.pid, ["celery", "system"], None)
    assert selectors.worker_state(row) == "live"
    first_seen = row.last_seen_at
    wait_for(lambda: _node(worker).last_seen_at > first_seen, message="a heartbeat")

    worker.stop()  # SIGTERM: a warm shutdown
    stopped = _node(worker)
    assert stopped.stopped_at is not None
    assert selectors.worker_state(stopped) == "stopped"


def test_worker__killed_turns_lost(start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("lost")
    wait_for(lambda: _node(worker), message="the worker's row")
    worker.kill()  # no shutdown signal runs
    lost = wait_for(
        lambda: selectors.worker_state(_node(worker)) == "lost", message="the worker lost"
    )
    assert lost
    assert _node(worker).stopped_at is None


def test_health__ok_with_worker_and_beat_then_down_when_the_worker_stops(
    start_worker: Callable[..., WorkerProcess],
    start_beat: Callable[[], BeatProcess],
    operator_client: APIClient,
) -> None:
    call_command("setup_periodic_tasks", verbosity=0)
    worker = start_worker("health")
    start_beat()
    wait_for(lambda: system_health().status == "ok", message="health ok")
    assert operator_client.get("/api/health/").json()["status"] == "ok"
    beat = Worker.objects.get(kind=WorkerKind.BEAT)
    assert selectors.worker_state(beat) == "live"

    worker.stop()
    report = wait_for(lambda: (r := system_health()).status == "down" and r, message="health down")
    [problem] = report.problems
    assert problem.name == "celery workers"
    assert problem.reason.startswith("no live Celery worker")
