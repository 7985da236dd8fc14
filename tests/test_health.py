"""GET /api/health/ (DESIGN 9.6): each component ok, degraded or down with a reason, the
dashboard's banner and the Prometheus gauges that say the same."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from scheduler_site.health import system_health
from tasks import services, workers
from tasks.models import Scheduler
from tests.tasks.helpers import T0


@pytest.fixture
def periodic_jobs(db: None) -> None:
    call_command("setup_periodic_tasks", verbosity=0)


def _live_system() -> None:
    """A Celery worker on the default queue and beat, both seen just now."""
    workers.worker_seen(kind="celery", name="w1@h", queues=["celery"], started=True)
    workers.worker_seen(kind="beat", name="beat@h", started=True)


def _components(client: APIClient) -> tuple[str, dict[str, tuple[str, str]]]:
    response = client.get("/api/health/")
    assert response.status_code == 200
    body = response.json()
    return body["status"], {c["name"]: (c["status"], c["reason"]) for c in body["components"]}


@pytest.mark.django_db
def test_health__ok_with_a_live_worker_and_beat(
    operator_client: APIClient, periodic_jobs: None
) -> None:
    _live_system()
    status, components = _components(operator_client)
    assert status == "ok"
    assert components["database"] == ("ok", "reachable")
    assert components["broker"] == ("ok", "reachable")
    assert components["celery workers"] == ("ok", "1 live: w1@h")
    assert components["beat"][0] == "ok"


@pytest.mark.django_db
def test_health__no_live_celery_worker_is_down(
    operator_client: APIClient, periodic_jobs: None, time_machine: TimeMachineFixture, settings
) -> None:
    time_machine.move_to(T0, tick=False)
    _live_system()
    time_machine.move_to(T0 + timedelta(seconds=3 * settings.WORKER_HEARTBEAT_SECONDS + 1))
    workers.worker_seen(kind="beat", name="beat@h")
    status, components = _components(operator_client)
    assert status == "down"
    assert components["celery workers"][0] == "down"
    assert "no live Celery worker (last seen 4 s ago)" in components["celery workers"][1]


@pytest.mark.django_db
def test_health__celery_queue_with_work_and_no_worker_on_its_queue_is_down(
    operator_client: APIClient, periodic_jobs: None, make_scheduler
) -> None:
    make_scheduler("flaky", kind="celery", handler="demo.flaky")
    services.task_push(scheduler_id="flaky")
    services.task_push(scheduler_id="flaky")
    workers.worker_seen(kind="celery", name="w1@h", queues=["other"])
    workers.worker_seen(kind="beat", name="beat@h")
    status, components = _components(operator_client)
    assert status == "down"
    assert components["queue flaky"] == (
        "down",
        "2 tasks due and 0 leased, and no live worker consumes Celery queue 'celery'",
    )
    workers.worker_seen(kind="celery", name="w2@h", queues=["celery"])
    status, components = _components(operator_client)
    assert (status, components["queue flaky"]) == (
        "ok",
        ("ok", "1 live workers on Celery queue 'celery'"),
    )


@pytest.mark.django_db
def test_health__a_paused_or_idle_queue_is_not_judged(
    operator_client: APIClient, periodic_jobs: None, make_scheduler
) -> None:
    make_scheduler("idle", kind="celery", handler="demo.flaky")
    make_scheduler("paused", kind="celery", handler="demo.flaky")
    services.task_push(scheduler_id="paused")
    services.scheduler_set_paused(scheduler_id="paused", paused=True)
    workers.worker_seen(kind="beat", name="beat@h")
    _status, components = _components(operator_client)
    assert not {"queue idle", "queue paused"} & set(components)


@pytest.mark.django_db
def test_health__beat_silent_for_three_intervals_is_down(
    operator_client: APIClient, periodic_jobs: None, time_machine: TimeMachineFixture, settings
) -> None:
    time_machine.move_to(T0, tick=False)
    _live_system()
    # The dispatcher is beat's most frequent job: 3 of its intervals, but at least 10 s.
    silence = max(3 * settings.DISPATCH_INTERVAL_SECONDS, 10)
    time_machine.move_to(T0 + timedelta(seconds=silence), tick=False)
    workers.worker_seen(kind="celery", name="w1@h")
    assert _components(operator_client)[1]["beat"][0] == "ok"
    time_machine.move_to(T0 + timedelta(seconds=silence + 1), tick=False)
    workers.worker_seen(kind="celery", name="w1@h")
    status, components = _components(operator_client)
    assert status == "down"
    expected = f"beat last sent a periodic job {silence + 1} s ago; expected every"
    assert components["beat"][1].startswith(expected)


@pytest.mark.django_db
def test_health__beat_without_periodic_jobs_is_degraded(operator_client: APIClient) -> None:
    _live_system()
    _status, components = _components(operator_client)
    assert components["beat"] == (
        "degraded",
        "no periodic job is enabled: run manage.py setup_periodic_tasks",
    )


@pytest.mark.django_db
def test_health__pull_queue_with_due_tasks_and_no_runner_seen_is_degraded(
    operator_client: APIClient, periodic_jobs: None, scheduler: Scheduler
) -> None:
    _live_system()
    services.task_push(scheduler_id=scheduler.id)
    status, components = _components(operator_client)
    assert status == "degraded"
    assert components["queue boefje"] == (
        "degraded",
        "1 tasks due and no runner has popped from it lately",
    )
    workers.worker_seen(kind="runner", name="r1", queues=["boefje"])
    assert _components(operator_client)[1]["queue boefje"][0] == "ok"


@pytest.mark.django_db
def test_health__anonymous_401_and_unknown_parameter_400(
    anon_client: APIClient, operator_client: APIClient
) -> None:
    assert anon_client.get("/api/health/").status_code == 401
    response = operator_client.get("/api/health/?verbose=1")
    assert response.status_code == 400
    assert "verbose" in response.json()


@pytest.mark.django_db
def test_dashboard__shows_the_health_banner_and_the_workers(
    operator, periodic_jobs: None, make_scheduler
) -> None:
    make_scheduler("flaky", kind="celery", handler="demo.flaky")
    services.task_push(scheduler_id="flaky")
    workers.worker_seen(kind="beat", name="beat@h")
    workers.worker_seen(kind="runner", name="r1", host="scanner", queues=["boefje"])
    client = Client()
    client.force_login(operator)
    page = client.get("/").content.decode()
    assert 'id="health" class="down"' in page
    assert "no live worker consumes Celery queue" in page
    assert "<td>r1</td><td>runner</td>" in page


@pytest.mark.django_db
def test_metrics__health_as_gauges(operator_client: APIClient, periodic_jobs: None) -> None:
    _live_system()
    text = operator_client.get("/metrics").content.decode()
    assert 'scheduler_health_status{component="overall"} 0.0' in text
    assert 'scheduler_health_status{component="beat"} 0.0' in text
    assert 'scheduler_workers{kind="celery",state="live"} 1.0' in text
    assert system_health().status == "ok"
