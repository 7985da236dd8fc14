"""Batch push (an array to push/) and batch report (POST /api/tasks/report/), DESIGN §9.3."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from tasks import batches, services
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tests.tasks.helpers import snapshot

S = TaskStatus
PUSH = "/api/schedulers/boefje/push/"

pytestmark = pytest.mark.django_db


def _push(client: APIClient, body: Any) -> Any:
    return client.post(PUSH, body, format="json")


def test_batch_push__one_outcome_per_item_in_order(
    operator_client: APIClient, scheduler: Scheduler
) -> None:
    response = _push(operator_client, [{"data": {"n": n}, "priority": n} for n in range(3)])

    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 201, 201]
    assert [r["task"]["data"] for r in results] == [{"n": 0}, {"n": 1}, {"n": 2}]
    ids = [r["task"]["id"] for r in results]
    assert Task.objects.filter(id__in=ids, status=S.QUEUED).count() == 3
    assert TaskEvent.objects.filter(task_id__in=ids, note="pushed").count() == 3


def test_batch_push__duplicates_are_409_naming_the_active_task(
    operator_client: APIClient, push: Callable[..., Task]
) -> None:
    active = push(hash="h1")

    results = _push(operator_client, [{"hash": "h1"}, {"hash": "h2"}, {"hash": "h2"}, {}]).json()[
        "results"
    ]

    assert [r["status"] for r in results] == [409, 201, 409, 201]
    assert results[0]["existing_id"] == str(active.id)
    assert results[2]["existing_id"] == results[1]["task"]["id"]  # the first of the batch wins
    assert Task.objects.filter(hash="h2").count() == 1


def test_batch_push__a_bounded_queue_takes_what_fits_then_429(
    operator_client: APIClient, make_scheduler: Callable[..., Scheduler]
) -> None:
    make_scheduler("boefje", max_queue_size=3)
    services.task_push(scheduler_id="boefje")

    results = _push(operator_client, [{"data": {"n": n}} for n in range(4)]).json()["results"]

    assert [r["status"] for r in results] == [201, 201, 429, 429]
    assert Task.objects.filter(scheduler_id="boefje", status=S.QUEUED).count() == 3


def test_batch_push__a_bad_item_is_400_and_the_others_are_pushed(
    operator_client: APIClient, scheduler: Scheduler
) -> None:
    results = _push(
        operator_client, [{"priority": "high"}, {"bogus": 1}, "not an object", {"data": {"ok": 1}}]
    ).json()["results"]

    assert [r["status"] for r in results] == [400, 400, 400, 201]
    assert "priority" in results[0]["errors"] and "bogus" in results[1]["errors"]
    assert Task.objects.count() == 1


@pytest.mark.parametrize("size", [0, batches.BATCH_MAX + 1])
def test_batch_push__empty_or_too_large_is_400_and_changes_nothing(
    operator_client: APIClient, scheduler: Scheduler, size: int
) -> None:
    before = snapshot()
    response = _push(operator_client, [{}] * size)
    assert response.status_code == 400
    assert snapshot() == before


def test_batch_push__unknown_scheduler_is_404(operator_client: APIClient) -> None:
    response = operator_client.post("/api/schedulers/nope/push/", [{}], format="json")
    assert response.status_code == 404


# --- batch report ---------------------------------------------------------------------------


def test_batch_report__each_report_applied_with_its_own_outcome(
    runner_client: APIClient, push: Callable[..., Task]
) -> None:
    for n in range(3):
        push(data={"n": n})
    one, two, three = services.task_pop(scheduler_id="boefje", limit=3)
    missing = uuid.uuid4()
    reports = [
        {"id": str(one.id), "lease_token": one.lease_token, "status": "COMPLETED", "result": 1},
        {"id": str(two.id), "lease_token": one.lease_token, "status": "COMPLETED"},
        {"id": str(three.id), "lease_token": three.lease_token, "status": "FAILED", "error": "x"},
        {"id": str(missing), "lease_token": "0" * 64, "status": "COMPLETED"},
    ]

    response = runner_client.post("/api/tasks/report/", {"reports": reports}, format="json")

    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["id"], r["status"]) for r in results] == [
        (str(one.id), 200),
        (str(two.id), 409),
        (str(three.id), 200),
        (str(missing), 404),
    ]
    assert results[0]["task"]["status"] == "COMPLETED"
    assert results[2]["task"]["status"] == "QUEUED"  # retried by the queue's policy
    assert Task.objects.get(id=two.id).status == S.DISPATCHED


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"reports": []},
        {"reports": [{"id": "x", "status": "COMPLETED"}]},
        {"reports": [{"id": str(uuid.uuid4()), "status": "DEAD"}]},
        {"reports": [{"id": str(uuid.uuid4()), "status": "COMPLETED", "bogus": 1}]},
        {"reports": [], "extra": 1},
    ],
)
def test_batch_report__bad_input_is_400(runner_client: APIClient, body: dict[str, Any]) -> None:
    response = runner_client.post("/api/tasks/report/", body, format="json")
    assert response.status_code == 400


def test_batch_report__a_runner_limited_to_other_queues_gets_404(
    make_scheduler: Callable[..., Scheduler], push: Callable[..., Task]
) -> None:
    make_scheduler("mine")
    services.task_push(scheduler_id="boefje")
    [theirs] = services.task_pop(scheduler_id="boefje")
    out = StringIO()
    call_command("create_api_user", "scoped", "--role", "runner", "--scheduler", "mine", stdout=out)
    [key] = [line.split()[2] for line in out.getvalue().splitlines() if "API token:" in line]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    report = {"id": str(theirs.id), "lease_token": theirs.lease_token, "status": "COMPLETED"}

    response = client.post("/api/tasks/report/", {"reports": [report]}, format="json")

    assert response.json()["results"][0]["status"] == 404
    assert Task.objects.get(id=theirs.id).status == S.DISPATCHED
