"""Workers, runners and beat register and heartbeat (DESIGN 9.6): the rows, their state, the
runner's registration through its API calls, and GET /api/workers/."""

from __future__ import annotations

from datetime import timedelta

import pytest
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from tasks import selectors, services, workers
from tasks.models import Scheduler, Task, TaskStatus, Worker, WorkerKind
from tests.tasks.helpers import T0

RUNNER_HEADERS = {
    "HTTP_X_RUNNER_NAME": "scan-runner-1",
    "HTTP_X_RUNNER_HOST": "scanner.example.org",
    "HTTP_X_RUNNER_PID": "4242",
}


@pytest.fixture(autouse=True)
def _no_throttled_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-process throttle of runner writes outlives a test; each starts without one.
    monkeypatch.setattr(workers, "_runner_writes", {})


@pytest.mark.django_db
def test_worker_seen__one_row_per_kind_and_name_updated_in_place(
    time_machine: TimeMachineFixture,
) -> None:
    time_machine.move_to(T0, tick=False)
    workers.worker_seen(
        kind="celery", name="w1@h", host="h", pid=1, queues=["celery"], started=True
    )
    time_machine.move_to(T0 + timedelta(seconds=5), tick=False)
    workers.worker_seen(kind="celery", name="w1@h", tasks_held=2)
    [row] = Worker.objects.all()
    assert (row.host, row.pid, row.queues, row.tasks_held) == ("h", 1, ["celery"], 2)
    assert (row.started_at, row.last_seen_at) == (T0, T0 + timedelta(seconds=5))


@pytest.mark.django_db
def test_worker_state__live_then_lost_without_heartbeat_and_stopped_on_shutdown(
    time_machine: TimeMachineFixture, settings: object
) -> None:
    time_machine.move_to(T0, tick=False)
    worker = workers.worker_seen(kind="celery", name="w1@h", started=True)
    assert selectors.worker_state(worker) == "live"
    time_machine.move_to(T0 + timedelta(seconds=3 * settings.WORKER_HEARTBEAT_SECONDS + 1))
    assert selectors.worker_state(worker) == "lost"
    workers.worker_seen(kind="celery", name="w1@h")
    workers.worker_stopped(kind="celery", name="w1@h")
    assert selectors.worker_state(Worker.objects.get()) == "stopped"
    # A restart under the same name is live again.
    assert selectors.worker_state(workers.worker_seen(kind="celery", name="w1@h")) == "live"


@pytest.mark.django_db
def test_workers_forget_unseen__deletes_rows_unseen_for_a_day(
    time_machine: TimeMachineFixture,
) -> None:
    time_machine.move_to(T0, tick=False)
    workers.worker_seen(kind="runner", name="old")
    time_machine.move_to(T0 + timedelta(days=1, seconds=1), tick=False)
    workers.worker_seen(kind="runner", name="new")
    assert workers.workers_forget_unseen() == 1
    assert list(Worker.objects.values_list("name", flat=True)) == ["new"]


@pytest.mark.django_db
def test_pop__registers_the_runner_by_its_headers(
    runner_client: APIClient, scheduler: Scheduler
) -> None:
    task = services.task_push(scheduler_id=scheduler.id)
    response = runner_client.post(
        "/api/schedulers/boefje/pop/", {"limit": 1}, format="json", **RUNNER_HEADERS
    )
    assert response.status_code == 200
    assert Task.objects.get(id=task.id).worker == "runner"  # held in the account's name
    row = Worker.objects.get(kind=WorkerKind.RUNNER)
    assert (row.name, row.host, row.pid, row.queues, row.account, row.tasks_held) == (
        "scan-runner-1",
        "scanner.example.org",
        4242,
        ["boefje"],
        "runner",
        1,
    )


@pytest.mark.django_db
def test_pop__a_runner_without_headers_is_known_by_its_account_and_address(
    runner_client: APIClient, scheduler: Scheduler
) -> None:
    runner_client.post("/api/schedulers/boefje/pop/", {"limit": 1}, format="json")
    row = Worker.objects.get(kind=WorkerKind.RUNNER)
    assert (row.name, row.host, row.pid) == ("runner", "127.0.0.1", None)


@pytest.mark.django_db
def test_runner_seen__heartbeats_write_at_most_once_per_interval(
    runner_client: APIClient, scheduler: Scheduler, time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(T0, tick=False)
    services.task_push(scheduler_id=scheduler.id)
    popped = runner_client.post(
        "/api/schedulers/boefje/pop/", {}, format="json", **RUNNER_HEADERS
    ).json()["results"][0]
    beat = {"lease_token": popped["lease_token"]}
    url = f"/api/tasks/{popped['id']}/heartbeat/"
    time_machine.move_to(T0 + timedelta(seconds=30), tick=False)
    assert runner_client.post(url, beat, format="json", **RUNNER_HEADERS).status_code == 200
    assert Worker.objects.get().last_seen_at == T0 + timedelta(seconds=30)
    time_machine.move_to(T0 + timedelta(seconds=31), tick=False)
    # Still within this process's write interval (the clock the throttle reads says so):
    # no write, the row keeps its time.
    workers._runner_writes.update(dict.fromkeys(workers._runner_writes, float("inf")))
    assert runner_client.post(url, beat, format="json", **RUNNER_HEADERS).status_code == 200
    assert Worker.objects.get().last_seen_at == T0 + timedelta(seconds=30)
    workers._runner_writes.clear()  # the interval is over
    assert runner_client.post(url, beat, format="json", **RUNNER_HEADERS).status_code == 200
    assert Worker.objects.get().last_seen_at == T0 + timedelta(seconds=31)


@pytest.mark.django_db
def test_api_workers__lists_every_kind_with_its_state(
    operator_client: APIClient, time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(T0, tick=False)
    workers.worker_seen(kind="celery", name="lost@h", queues=["celery"])
    time_machine.move_to(T0 + timedelta(minutes=5), tick=False)
    workers.worker_seen(kind="celery", name="w1@h", host="h", pid=7, queues=["celery"])
    workers.worker_seen(kind="runner", name="r1", queues=["boefje"], tasks_held=3)
    workers.worker_seen(kind="beat", name="beat@h")
    workers.worker_stopped(kind="beat", name="beat@h")

    response = operator_client.get("/api/workers/")
    assert response.status_code == 200
    rows = {row["name"]: row for row in response.json()["results"]}
    assert {name: row["state"] for name, row in rows.items()} == {
        "beat@h": "stopped",
        "lost@h": "lost",
        "w1@h": "live",
        "r1": "live",
    }
    assert (rows["w1@h"]["host"], rows["w1@h"]["pid"], rows["w1@h"]["queues"]) == (
        "h",
        7,
        ["celery"],
    )
    assert rows["r1"]["tasks_held"] == 3
    only_runners = operator_client.get("/api/workers/?kind=runner").json()["results"]
    assert [row["name"] for row in only_runners] == ["r1"]
    assert operator_client.get("/api/workers/?kind=nope").status_code == 400
    assert operator_client.get("/api/workers/?live=1").status_code == 400


@pytest.mark.django_db
def test_tasks_held_by__counts_the_leased_tasks_of_that_holder(scheduler: Scheduler) -> None:
    for _ in range(3):
        services.task_push(scheduler_id=scheduler.id)
    services.task_pop(scheduler_id=scheduler.id, limit=2, worker="r1")
    assert selectors.tasks_held_by("r1") == 2
    assert selectors.tasks_held_by("r2") == 0
    assert Task.objects.filter(status=TaskStatus.QUEUED).count() == 1
