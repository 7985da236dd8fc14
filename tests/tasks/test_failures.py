"""Failures an operator can read: the full traceback of a handler failure (DESIGN 9.6) from
workers and pull runners, failed attempts counted per hour, the error column and search, and
the dead letters grouped by error with "requeue these"."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from tasks import dispatch, execution, housekeeping, selectors, services, stats
from tasks.models import QueueMinute, Scheduler, Task, TaskStatus, Worker
from tasks.pull_runner import ApiClient, PullRunner, Work
from tasks.registry import get_handler
from tests.tasks.helpers import T0, fresh, pop_one

S = TaskStatus


def _failed_on_a_worker(message: str = "disk\nfull") -> Task:
    services.scheduler_create(id="sleepy", kind="celery", handler="demo.sleep")
    task = services.task_push(scheduler_id="sleepy", data={"seconds": 0, "fail": message})
    assert dispatch.dispatch_scheduler("sleepy") == 1
    assert execution.execute(task.id, 1, worker="w1") == "failed"
    return fresh(task)


@pytest.fixture
def admin_client(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("boss", "boss@example.org", "x"))
    return client


@pytest.mark.django_db
def test_execute__a_handler_failure_keeps_its_traceback_and_a_one_line_error() -> None:
    task = _failed_on_a_worker()
    assert (task.status, task.error) == (S.QUEUED, "RuntimeError: disk …")  # retried
    assert task.traceback.startswith("Traceback (most recent call last):")
    assert 'tasks/handlers.py", line' in task.traceback
    assert task.traceback.rstrip().endswith("RuntimeError: disk\nfull")


def test_one_line__type_and_first_line_capped() -> None:
    assert execution.one_line(ValueError("bad")) == "ValueError: bad"
    assert execution.one_line(KeyError("k")) == "KeyError: 'k'"
    assert execution.one_line(RuntimeError("")) == "RuntimeError: "
    assert execution.one_line(RuntimeError("x" * 2000)) == "RuntimeError: " + "x" * 1000 + " …"


@pytest.mark.django_db
def test_api__the_traceback_is_shown_and_read_only(operator_client: APIClient) -> None:
    task = _failed_on_a_worker()
    body = operator_client.get(f"/api/tasks/{task.id}/").json()
    assert body["traceback"] == task.traceback
    assert body["error"] == "RuntimeError: disk …"
    response = operator_client.patch(f"/api/tasks/{task.id}/", {"traceback": "x"}, format="json")
    assert response.status_code == 400
    assert fresh(task).traceback == task.traceback


@pytest.mark.django_db
def test_api__a_runner_reports_a_traceback_with_failed(
    runner_client: APIClient, scheduler: Scheduler
) -> None:
    services.task_push(scheduler_id=scheduler.id)
    popped = runner_client.post("/api/schedulers/boefje/pop/", {}, format="json").json()
    task = popped["results"][0]
    report = {
        "status": "FAILED",
        "error": "ValueError: no",
        "traceback": "Traceback (most recent call last):\n  ...\nValueError: no\n",
        "lease_token": task["lease_token"],
    }
    assert (
        runner_client.patch(f"/api/tasks/{task['id']}/", report, format="json").status_code == 200
    )
    assert Task.objects.get(id=task["id"]).traceback == report["traceback"]


@pytest.mark.django_db
def test_requeue__clears_the_error_and_the_traceback() -> None:
    task = _failed_on_a_worker()
    services.task_cancel(task_id=task.id)
    requeued = services.task_requeue(task_id=task.id)
    assert (requeued.error, requeued.traceback) == ("", "")


def test_pull_runner__reports_the_handlers_traceback_and_is_seen_by_its_name(
    live_server: Any, runner_client: APIClient, scheduler: Scheduler
) -> None:
    task = services.task_push(scheduler_id=scheduler.id, data={"seconds": 0, "fail": "boom"})
    token = str(runner_client._credentials["HTTP_AUTHORIZATION"]).split()[-1]
    with ApiClient(live_server.url, token, runner_name="r-test") as client:
        runner = PullRunner(
            client=client,
            scheduler_id=scheduler.id,
            work=Work(handler=get_handler("demo.sleep")),
            max_tasks=1,
        )
        assert runner.run() == 1
    failed = fresh(task)
    assert failed.error == "RuntimeError: boom"
    assert failed.traceback.rstrip().endswith("RuntimeError: boom")
    assert Worker.objects.get(kind="runner").name == "r-test"


@pytest.mark.django_db
def test_failed_attempts__counts_retried_lost_and_final_not_hand_backs(
    make_scheduler: Any, time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(T0, tick=False)
    make_scheduler("retry", retry_policy="fixed", retry_delay_seconds=0, max_attempts=3)
    task = services.task_push(scheduler_id="retry")
    pop_one("retry")
    services.task_fail(task_id=task.id, error="one")  # retried
    pop_one("retry")
    services.task_hand_back(task_id=task.id, reason="shutting down")  # not a failure
    time_machine.move_to(T0 + timedelta(minutes=59), tick=False)
    pop_one("retry")
    time_machine.move_to(T0 + timedelta(hours=1, minutes=10), tick=False)
    assert housekeeping.tasks_reap_expired() == 1  # lost: a failed attempt, retried
    pop_one("retry")
    services.task_fail(task_id=task.id, error="three")  # final: DEAD
    assert fresh(task).status == S.DEAD

    time_machine.move_to(T0 + timedelta(hours=2), tick=False)
    stats.queue_stats_rollup(backfill=timedelta(hours=3))
    per_hour: dict[int, int] = {}
    for row in QueueMinute.objects.filter(scheduler_id="retry"):
        hour = (row.minute - stats.epoch_minute(T0.replace(minute=0))) // 60
        per_hour[hour] = per_hour.get(hour, 0) + row.failed_attempts
    assert per_hour == {0: 1, 1: 2}


@pytest.mark.django_db
def test_admin__the_task_page_shows_the_traceback_and_the_list_an_error_column(
    admin_client: Client,
) -> None:
    task = _failed_on_a_worker("<b>not html</b>")
    page = admin_client.get(f"/admin/tasks/task/{task.id}/change/").content.decode()
    assert '<pre class="traceback">Traceback (most recent call last):' in page
    assert "RuntimeError: &lt;b&gt;not html&lt;/b&gt;" in page
    listing = admin_client.get("/admin/tasks/task/").content.decode()
    assert (
        '<td class="field-error_summary">RuntimeError: &lt;b&gt;not html&lt;/b&gt;</td>' in listing
    )


@pytest.mark.django_db
def test_admin__search_finds_tasks_by_error_text(
    admin_client: Client, scheduler: Scheduler
) -> None:
    for error in ("nmap: host unreachable", "dns: SERVFAIL"):
        services.task_push(scheduler_id=scheduler.id)
        services.task_fail(task_id=pop_one().id, error=error)
    listing = admin_client.get("/admin/tasks/task/?q=unreachable").content.decode()
    assert "nmap: host unreachable" in listing
    assert "SERVFAIL" not in listing


def _dead(scheduler_id: str, error: str, n: int) -> list[Task]:
    tasks = []
    for _ in range(n):
        task = services.task_push(scheduler_id=scheduler_id)
        pop_one(scheduler_id)
        tasks.append(services.task_fail(task_id=task.id, error=error))
    return tasks


@pytest.mark.django_db
def test_dead_letters__grouped_by_error_and_requeued_one_group_at_a_time(
    admin_client: Client, make_scheduler: Any
) -> None:
    make_scheduler("scan", retry_policy="none")
    timeouts = _dead("scan", "nmap: timed out", 3)
    _dead("scan", "dns: SERVFAIL", 1)
    assert {t.status for t in timeouts} == {S.DEAD}
    page = admin_client.get("/admin/tasks/task/dead-letters/").content.decode()
    assert page.index("nmap: timed out") < page.index("dns: SERVFAIL")  # the largest first
    assert "Requeue these 3" in page

    response = admin_client.post(
        "/admin/tasks/task/dead-letters/", {"scheduler": "scan", "error": "nmap: timed out"}
    )
    assert response.status_code == 302
    assert {fresh(t).status for t in timeouts} == {S.QUEUED}
    assert Task.objects.filter(status=S.DEAD, error="dns: SERVFAIL").count() == 1
    assert [g["count"] for g in selectors.dead_letter_groups()] == [1]


@pytest.mark.django_db
def test_dead_letters__requeue_needs_the_change_permission(make_scheduler: Any) -> None:
    make_scheduler("scan", retry_policy="none")
    [task] = _dead("scan", "boom", 1)
    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_task"))
    client = Client()
    client.force_login(viewer)
    assert client.get("/admin/tasks/task/dead-letters/").status_code == 200
    response = client.post(
        "/admin/tasks/task/dead-letters/", {"scheduler": "scan", "error": "boom"}
    )
    assert response.status_code == 403
    assert fresh(task).status == S.DEAD


@pytest.mark.django_db
def test_series__charts_failed_attempts_beside_failed_and_dead(
    operator_client: APIClient, make_scheduler: Any, time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(T0, tick=False)
    make_scheduler("retry", retry_policy="fixed", retry_delay_seconds=0, max_attempts=2)
    task = services.task_push(scheduler_id="retry")
    pop_one("retry")
    services.task_fail(task_id=task.id, error="one")
    time_machine.move_to(T0 + timedelta(minutes=2), tick=False)
    stats.queue_stats_rollup()
    body = operator_client.get("/api/tasks/series/?range=24h").json()
    assert (sum(body["failed_attempts"]), sum(body["failed"]), sum(body["dead"])) == (1, 0, 0)
