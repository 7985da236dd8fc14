"""Health from real processes (DESIGN 9.6): a Celery worker registers when it starts, beats,
is marked stopped when it shuts down and turns lost when killed; beat registers when it sends;
GET /api/health/ goes from ok to down when the worker stops."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from rest_framework.test import APIClient

from scheduler_site.health import system_health
from tasks import selectors
from tasks.models import Worker, WorkerKind
from tests.e2e.conftest import CELERY, ROOT, WorkerProcess, _database_url, wait_for

pytestmark = pytest.mark.e2e


def _node(worker: WorkerProcess) -> Worker | None:
    return Worker.objects.filter(kind=WorkerKind.CELERY, name__startswith=f"{worker.name}@").first()


def test_worker__registers_beats_and_is_marked_stopped_on_shutdown(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("reg")
    row = wait_for(lambda: _node(worker), message="the worker's row")
    assert (row.pid, row.queues, row.stopped_at) == (worker.process.pid, ["celery"], None)
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


class BeatProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.out = log.open("w")
        command = [CELERY, "-A", "scheduler_site", "beat", "-l", "INFO", "--pidfile="]
        command += ["--scheduler", "django_celery_beat.schedulers:DatabaseScheduler"]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.out.close()


@pytest.fixture
def start_beat(start_worker: Any, tmp_path: Path) -> Iterator[Callable[[], BeatProcess]]:
    # After start_worker: the same database and broker for both.
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings_test",
        "DATABASE_URL": _database_url(),
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "SCHEDULER_BROKER_DIR": str(settings.CELERY_BROKER_DIR),
    }
    started: list[BeatProcess] = []

    def start() -> BeatProcess:
        started.append(BeatProcess(env, tmp_path / "beat.log"))
        return started[-1]

    yield start
    for beat in started:
        beat.stop()


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
