"""The REST API's scheduler CRUD (DESIGN 6.1): create, retrieve, list with counts, patch and
delete, and the bad input of each. Push, pop and tasks are in test_api.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from tasks import services
from tasks.models import Scheduler, Task, TaskStatus
from tests.tasks.helpers import (
    SYSTEM_QUEUES,
    forbid_server_errors,
    snapshot,
    user_schedulers,
)

S = TaskStatus


@pytest.fixture(autouse=True)
def _no_server_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_server_errors(monkeypatch)


# --- scheduler CRUD --------------------------------------------------------------------------


@pytest.mark.django_db
def test_scheduler__create_retrieve_list_with_counts(
    operator_client: APIClient, push: Callable[..., Task]
) -> None:
    created = operator_client.post(
        "/api/schedulers/", {"id": "new-q", "max_queue_size": 10, "kind": "pull"}, format="json"
    )
    assert created.status_code == 201
    assert (created.json()["id"], created.json()["max_queue_size"]) == ("new-q", 10)
    assert Scheduler.objects.get(id="new-q").max_queue_size == 10
    push(), push()
    services.task_pop(scheduler_id="boefje")

    one = operator_client.get("/api/schedulers/boefje/").json()
    assert one["counts"] == {**dict.fromkeys(S.values, 0), "QUEUED": 1, "DISPATCHED": 1}
    listing = {s["id"]: s for s in operator_client.get("/api/schedulers/").json()["results"]}
    assert set(listing) - SYSTEM_QUEUES == {"boefje", "new-q"}
    assert listing["boefje"]["counts"]["QUEUED"] == 1
    assert listing["new-q"]["counts"] == dict.fromkeys(S.values, 0)


@pytest.mark.django_db
def test_scheduler__celery_queue_created_shown_and_patched(operator_client: APIClient) -> None:
    body = {"id": "slow", "kind": "celery", "handler": "demo.sleep", "celery_queue": "slow-pool"}
    created = operator_client.post("/api/schedulers/", body, format="json")
    assert created.status_code == 201 and created.json()["celery_queue"] == "slow-pool"

    patched = operator_client.patch(
        "/api/schedulers/slow/", {"celery_queue": "slower.pool"}, format="json"
    )
    assert patched.status_code == 200
    assert Scheduler.objects.get(id="slow").celery_queue == "slower.pool"
    default = operator_client.post("/api/schedulers/", {"id": "plain"}, format="json")
    assert default.json()["celery_queue"] == "celery"


@pytest.mark.django_db
def test_scheduler__patch(operator_client: APIClient, scheduler: Scheduler) -> None:
    response = operator_client.patch(
        "/api/schedulers/boefje/", {"max_queue_size": 7}, format="json"
    )
    assert response.status_code == 200 and response.json()["id"] == "boefje"
    assert Scheduler.objects.get(id="boefje").max_queue_size == 7


@pytest.mark.django_db
def test_scheduler__patch_refuses_a_new_id_and_changes_nothing(
    operator_client: APIClient, scheduler: Scheduler
) -> None:
    # The id was dropped silently (200): a client believed the queue renamed.
    response = operator_client.patch(
        "/api/schedulers/boefje/", {"max_queue_size": 7, "id": "renamed"}, format="json"
    )
    assert response.status_code == 400 and list(response.json()) == ["id"]
    assert Scheduler.objects.get(id="boefje").max_queue_size == 0
    assert not Scheduler.objects.filter(id="renamed").exists()


@pytest.mark.django_db
def test_scheduler__policy_weights_are_set_on_create_and_patch(operator_client: APIClient) -> None:
    # They could be set in the admin only: the API dropped them.
    body = {"id": "q", "policy_weights": {"highest_priority_first": 3, "never_run_first": 1}}
    created = operator_client.post("/api/schedulers/", body, format="json")
    assert created.status_code == 201
    assert created.json()["policy_weights"] == body["policy_weights"]

    patched = operator_client.patch(
        "/api/schedulers/q/", {"policy_weights": {"most_overdue_first": 1}}, format="json"
    )
    assert patched.status_code == 200
    assert Scheduler.objects.get(id="q").policy_weights == {"most_overdue_first": 1}


@pytest.mark.django_db
@pytest.mark.parametrize(
    "weights",
    [
        {"fastest_first": 1},
        {"never_run_first": 0},
        {"never_run_first": -1},
        {"never_run_first": 1.5},
        {"never_run_first": True},
        {},
        [1],
        None,
        "most_overdue_first",
    ],
)
def test_scheduler__bad_policy_weights_are_400_and_change_nothing(
    operator_client: APIClient, scheduler: Scheduler, weights: Any
) -> None:
    before = snapshot()
    created = operator_client.post(
        "/api/schedulers/", {"id": "q", "policy_weights": weights}, format="json"
    )
    patched = operator_client.patch(
        "/api/schedulers/boefje/", {"policy_weights": weights}, format="json"
    )
    assert (created.status_code, list(created.json())) == (400, ["policy_weights"])
    assert (patched.status_code, list(patched.json())) == (400, ["policy_weights"])
    assert snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "Bad Id!"}, "id"),
        ({"id": "boefje"}, "id"),
        ({}, "id"),
        ({"id": "x", "kind": "celery"}, "handler"),
        ({"id": "x", "kind": "bogus"}, "kind"),
        (
            {"id": "x", "retry_delay_seconds": 100, "retry_max_delay_seconds": 10},
            "retry_max_delay_seconds",
        ),
        ({"id": "x", "max_attempts": 0}, "max_attempts"),
        ({"id": "x", "lease_seconds": 0}, "lease_seconds"),
        ({"id": "x", "max_queue_size": -1}, "max_queue_size"),
        ({"id": "x", "retry_policy": "sometimes"}, "retry_policy"),
        ({"id": "x", "celery_queue": ""}, "celery_queue"),
        ({"id": "x", "celery_queue": "two words"}, "celery_queue"),
        ({"id": "x", "celery_queue": "q" * 101}, "celery_queue"),
    ],
)
def test_scheduler__create_400_names_the_field(
    operator_client: APIClient, scheduler: Scheduler, body: dict[str, Any], field: str
) -> None:
    response = operator_client.post("/api/schedulers/", body, format="json")
    assert response.status_code == 400 and field in response.json(), response.json()
    assert list(user_schedulers().values_list("id", flat=True)) == ["boefje"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"retry_max_delay_seconds": 5}, "retry_max_delay_seconds"),
        ({"kind": "celery"}, "handler"),
        ({"max_attempts": 101}, "max_attempts"),
    ],
)
def test_scheduler__patch_400_names_the_field(
    operator_client: APIClient, scheduler: Scheduler, body: dict[str, Any], field: str
) -> None:
    before = snapshot()
    response = operator_client.patch("/api/schedulers/boefje/", body, format="json")
    assert response.status_code == 400 and field in response.json()
    assert snapshot() == before


@pytest.mark.django_db
def test_scheduler__delete_refused_with_active_tasks(
    operator_client: APIClient, push: Callable[..., Task]
) -> None:
    task = push()
    refused = operator_client.delete("/api/schedulers/boefje/")
    assert refused.status_code == 409 and "active" in refused.json()["detail"]
    assert Scheduler.objects.filter(id="boefje").exists()

    operator_client.post(f"/api/tasks/{task.id}/cancel/")
    assert operator_client.delete("/api/schedulers/boefje/").status_code == 204
    assert not Scheduler.objects.filter(id="boefje").exists()
