"""The per-minute rollup of queue work and the series the charts read (GET
/api/tasks/series/): throughput, failed attempts and queue wait p50/p95 over 1h, 24h, 7d;
the dashboard's panels as fragments and the per-queue page."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from tasks import dispatch, selectors, services, stats, workers
from tasks.models import QueueMinute, Scheduler
from tests.tasks.helpers import T0, pop_one

MINUTE = stats.epoch_minute(T0)


@pytest.fixture
def admin_client(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("boss", "boss@example.org", "x"))
    return client


def _pull_work(frozen: TimeMachineFixture, make_scheduler: Any) -> None:
    """Minute 0: two tasks popped after 2 s and 40 s, one completed, one failed (retried).
    Minute 1: the retry popped and failed for good (DEAD)."""
    make_scheduler("scan", retry_policy="fixed", retry_delay_seconds=0, max_attempts=2)
    services.task_push(scheduler_id="scan", priority=1)
    services.task_push(scheduler_id="scan", priority=2)
    frozen.move_to(T0 + timedelta(seconds=2), tick=False)
    services.task_complete(task_id=pop_one("scan").id, result={})
    frozen.move_to(T0 + timedelta(seconds=40), tick=False)
    second = pop_one("scan")
    services.task_fail(task_id=second.id, error="one")  # retry due at once (at 40 s)
    frozen.move_to(T0 + timedelta(seconds=70), tick=False)
    pop_one("scan")
    services.task_fail(task_id=second.id, error="two")


@pytest.mark.django_db
def test_rollup__counts_and_waits_per_queue_and_minute(
    frozen: TimeMachineFixture, make_scheduler: Any
) -> None:
    _pull_work(frozen, make_scheduler)
    frozen.move_to(T0 + timedelta(minutes=3), tick=False)
    assert stats.queue_stats_rollup() == 2
    rows = {r.minute - MINUTE: r for r in QueueMinute.objects.filter(scheduler_id="scan")}
    assert {
        m: (r.started, r.completed, r.failed_attempts, r.failed, r.dead) for m, r in rows.items()
    } == {
        0: (2, 1, 1, 0, 0),
        1: (1, 0, 1, 0, 1),
    }
    # Minute 0: 2 s (bucket ≤ 2.5). The 40 s of the failed first attempt are not known any
    # more (the retry moved the task's not_before): left out. The retry waited 30 s (≤ 30).
    assert (rows[0].wait_5, rows[0].wait_sum, rows[0].wait_9) == (1, 2.0, 0)
    assert (rows[1].wait_8, rows[1].wait_sum) == (1, 30.0)


@pytest.mark.django_db
def test_rollup__a_celery_queue_is_timed_to_the_workers_claim(
    frozen: TimeMachineFixture, make_scheduler: Any
) -> None:
    make_scheduler("echo", kind="celery", handler="demo.echo")
    task = services.task_push(scheduler_id="echo")
    dispatch.dispatch_scheduler("echo")  # dispatched at once: not the wait's end
    frozen.move_to(T0 + timedelta(seconds=0.3), tick=False)
    services.task_start(task_id=task.id, actor="w1", attempt=1, mint_token=True)
    frozen.move_to(T0 + timedelta(minutes=2), tick=False)
    stats.queue_stats_rollup()
    row = QueueMinute.objects.get(scheduler_id="echo")
    assert (row.started, row.wait_3, row.wait_sum) == (1, 1, pytest.approx(0.3))


@pytest.mark.django_db
def test_rollup__runs_again_without_counting_twice_and_prunes_old_rows(
    frozen: TimeMachineFixture, make_scheduler: Any
) -> None:
    QueueMinute.objects.create(scheduler_id="old", minute=MINUTE - 9 * 24 * 60)
    _pull_work(frozen, make_scheduler)
    frozen.move_to(T0 + timedelta(minutes=3), tick=False)
    stats.queue_stats_rollup()
    frozen.move_to(T0 + timedelta(minutes=4), tick=False)
    stats.queue_stats_rollup()
    assert list(QueueMinute.objects.values_list("scheduler_id", "minute", "started")) == [
        ("scan", MINUTE, 2),
        ("scan", MINUTE + 1, 1),
    ]


def test_quantile__interpolated_within_the_bucket() -> None:
    row = {"wait_4": 50, "wait_6": 50}  # 50 in (0.5, 1], 50 in (2.5, 5]
    assert selectors._quantile(row, 0.5) == 1.0
    assert selectors._quantile(row, 0.95) == 4.75
    assert selectors._quantile(None, 0.5) is None


@pytest.mark.django_db
def test_series__points_per_range_and_the_sums_of_the_rollup(
    frozen: TimeMachineFixture, make_scheduler: Any, operator_client: APIClient
) -> None:
    _pull_work(frozen, make_scheduler)
    frozen.move_to(T0 + timedelta(minutes=3), tick=False)
    stats.queue_stats_rollup()
    for range_name, points, step in (("1h", 60, 60), ("24h", 96, 900), ("7d", 168, 3600)):
        body = operator_client.get(f"/api/tasks/series/?range={range_name}").json()
        assert (len(body["t"]), body["step_seconds"]) == (points, step)
        assert (sum(body["completed"]), sum(body["failed_attempts"]), sum(body["dead"])) == (
            1,
            2,
            1,
        )
    hour = operator_client.get("/api/tasks/series/?range=1h&scheduler=scan").json()
    index = hour["t"].index(MINUTE * 60)
    assert hour["started"][index : index + 2] == [2, 1]
    # Minute 0: one wait of 2 s, in (1, 2.5]; minute 1: one of 30 s, in (10, 30].
    assert hour["wait_p50"][index : index + 2] == [1.75, 20.0]
    assert hour["wait_p95"][index : index + 2] == [2.425, 29.0]
    assert hour["wait_p50"][0] is None  # nothing started then
    assert sum(operator_client.get("/api/tasks/series/?scheduler=other").json()["started"]) == 0


@pytest.mark.django_db
def test_series__bad_range_or_parameter_is_400(operator_client: APIClient) -> None:
    assert "range" in operator_client.get("/api/tasks/series/?range=2h").json()
    assert "hours" in operator_client.get("/api/tasks/series/?hours=2").json()


@pytest.mark.django_db
def test_dashboard__each_panel_is_a_fragment_and_an_unknown_one_404(admin_client: Client) -> None:
    health = admin_client.get("/?panel=health")
    assert health.status_code == 200
    assert health.content.decode().lstrip().startswith('<div id="health"')
    assert admin_client.get("/?panel=nope").status_code == 404
    page = admin_client.get("/").content.decode()
    for panel in ("health", "workers", "queues", "dead-letters", "schedules", "pilots"):
        assert f'data-panel="{panel}"' in page
    assert "/static/vendor/uplot/uPlot.iife.min.js" in page
    assert '<meta http-equiv="refresh"' not in page


@pytest.mark.django_db
def test_queue_page__depth_rates_workers_and_recent_failures(
    frozen: TimeMachineFixture, make_scheduler: Any, admin_client: Client
) -> None:
    _pull_work(frozen, make_scheduler)
    workers.worker_seen(kind="runner", name="r-scan", queues=["scan"])
    workers.worker_seen(kind="runner", name="r-other", queues=["other"])
    frozen.move_to(T0 + timedelta(minutes=3), tick=False)
    stats.queue_stats_rollup()
    page = admin_client.get("/queues/scan/").content.decode()
    assert "Queue scan" in page
    assert "completed (last hour)<b>1</b>" in page
    assert "failed attempts (last hour)<b>2</b>" in page
    assert "<td>r-scan</td>" in page and "r-other" not in page
    assert page.count("attempt 2/2 failed: two") == 1 and "attempt 1/2 failed: one" in page
    assert 'data-scheduler="scan"' in page
    assert admin_client.get("/queues/nope/").status_code == 404
    assert admin_client.get("/queues/scan/?panel=workers").status_code == 200


@pytest.mark.django_db
def test_queue_page__needs_a_login(scheduler: Scheduler) -> None:
    response = Client().get("/queues/boefje/")
    assert response.status_code == 302
