"""Handing a running attempt back to its queue, attempt not spent (DESIGN 4.5): the
task_hand_back service and its REST endpoint, POST /api/tasks/{id}/release/."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from tasks import services
from tasks.exceptions import TransitionRefused
from tasks.models import Scheduler, Task, TaskStatus
from tests.tasks.helpers import (
    T0,
    celery_queue,
    fresh,
    history,
    running_task,
    snapshot,
)

S = TaskStatus


# --- task_hand_back --------------------------------------------------------------------------


@pytest.mark.django_db
def test_task_hand_back__running_task_back_to_the_queue_attempt_not_spent(
    frozen: TimeMachineFixture,
) -> None:
    celery_queue("echo", "demo.echo")
    task = running_task("echo")

    handed = services.task_hand_back(
        task_id=task.id, reason="runner stopping", actor="r1", attempt=1
    )

    assert handed.status == S.QUEUED
    task = fresh(task)
    assert (task.status, task.attempts, task.lock_waits, task.worker) == (S.QUEUED, 0, 0, "")
    assert (task.not_before, task.lease_expires_at) == (T0, None)
    assert history(task)[-1] == (
        S.RUNNING,
        S.QUEUED,
        "handed back, attempt not spent: runner stopping",
    )


@pytest.mark.django_db
def test_task_hand_back__stale_attempt_is_refused() -> None:
    celery_queue("echo", "demo.echo")
    task = running_task("echo")
    before = snapshot()

    with pytest.raises(TransitionRefused, match="not 2"):
        services.task_hand_back(task_id=task.id, reason="x", attempt=2)

    assert snapshot() == before


@pytest.mark.django_db
def test_task_hand_back__not_leased_is_refused() -> None:
    celery_queue("echo", "demo.echo", paused=True)
    task = services.task_push(scheduler_id="echo")
    before = snapshot()

    with pytest.raises(TransitionRefused, match="it is QUEUED"):
        services.task_hand_back(task_id=task.id, reason="x")

    assert snapshot() == before


@pytest.mark.django_db
def test_task_hand_back__cancel_requested_ends_cancelled() -> None:
    celery_queue("echo", "demo.echo")
    task = running_task("echo")
    services.task_cancel(task_id=task.id)

    services.task_hand_back(task_id=task.id, reason="runner stopping", attempt=1)

    task = fresh(task)
    assert (task.status, task.lease_expires_at) == (S.CANCELLED, None)
    assert "cancel was requested" in history(task)[-1][2]


# --- POST /api/tasks/{id}/release/ -----------------------------------------------------------


@pytest.fixture
def leased(scheduler: Scheduler) -> Task:
    services.task_push(scheduler_id=scheduler.id, data={"n": 1})
    [popped] = services.task_pop(scheduler_id=scheduler.id, worker="runner")
    return services.task_start(task_id=popped.id, actor="runner", attempt=1)


@pytest.mark.django_db
def test_release__runner_hands_its_task_back(runner_client: APIClient, leased: Task) -> None:
    response = runner_client.post(
        f"/api/tasks/{leased.id}/release/",
        {"attempt": 1, "reason": "r1 stopping", "lease_token": leased.lease_token},
        format="json",
    )

    assert response.status_code == 200, response.content
    assert (response.json()["status"], response.json()["attempts"]) == ("QUEUED", 0)
    assert history(leased)[-1] == (
        S.RUNNING,
        S.QUEUED,
        "handed back, attempt not spent: r1 stopping",
    )
    assert fresh(leased).events.last().actor == "runner"


@pytest.mark.django_db
def test_release__default_reason(runner_client: APIClient, leased: Task) -> None:
    response = runner_client.post(
        f"/api/tasks/{leased.id}/release/", {"lease_token": leased.lease_token}, format="json"
    )

    assert response.status_code == 200
    assert history(leased)[-1][2] == "handed back, attempt not spent: released by its runner"


@pytest.mark.django_db
@pytest.mark.parametrize("reason", ["", "\r", "  \n "])
def test_release__blank_reason_means_the_default(
    runner_client: APIClient, leased: Task, reason: str
) -> None:
    # Found by schemathesis: "\r" is a schema-valid string that trimming made blank, and a
    # blank reason was refused with a 400.
    response = runner_client.post(
        f"/api/tasks/{leased.id}/release/",
        {"attempt": 1, "reason": reason, "lease_token": leased.lease_token},
        format="json",
    )

    assert response.status_code == 200, response.json()
    assert history(leased)[-1][2] == "handed back, attempt not spent: released by its runner"


def test_release__needs_the_runner_permission(leased: Task, anon_client: APIClient) -> None:
    viewer = User.objects.create_user(username="viewer")
    client = APIClient()
    client.force_authenticate(viewer)
    before = snapshot()

    assert client.post(f"/api/tasks/{leased.id}/release/", {}, format="json").status_code == 403
    assert (
        anon_client.post(f"/api/tasks/{leased.id}/release/", {}, format="json").status_code == 401
    )

    assert snapshot() == before


@pytest.mark.django_db
def test_release__stale_attempt_is_409(runner_client: APIClient, leased: Task) -> None:
    before = snapshot()

    response = runner_client.post(f"/api/tasks/{leased.id}/release/", {"attempt": 2}, format="json")

    assert response.status_code == 409
    assert response.json()["status"] == S.RUNNING
    assert snapshot() == before


@pytest.mark.django_db
def test_release__not_leased_is_409(runner_client: APIClient, leased: Task) -> None:
    services.task_complete(task_id=leased.id, result=1, attempt=1)
    before = snapshot()

    response = runner_client.post(f"/api/tasks/{leased.id}/release/", {}, format="json")

    assert response.status_code == 409
    assert response.json()["status"] == S.COMPLETED
    assert snapshot() == before


@pytest.mark.django_db
def test_release__cancel_requested_is_cancelled(runner_client: APIClient, leased: Task) -> None:
    services.task_cancel(task_id=leased.id, actor="operator")

    response = runner_client.post(
        f"/api/tasks/{leased.id}/release/",
        {"attempt": 1, "lease_token": leased.lease_token},
        format="json",
    )

    assert response.status_code == 200
    assert response.json()["status"] == S.CANCELLED
    assert fresh(leased).status == S.CANCELLED
