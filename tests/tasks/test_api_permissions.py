"""Who may call which endpoint of the tasks API (anonymous, runner, operator), plus /healthz
and the OpenAPI schema."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from tasks import services
from tasks.models import Scheduler
from tasks.retry import RetrySpec
from tests.tasks.helpers import call, fill, forbid_server_errors, snapshot


@pytest.fixture(autouse=True)
def _no_server_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_server_errors(monkeypatch)


@pytest.fixture
def world(scheduler: Scheduler, make_scheduler: Callable[..., Scheduler]) -> dict[str, str]:
    make_scheduler("spare")
    queued = services.task_push(scheduler_id="boefje", data={"k": "queued"})
    services.task_push(scheduler_id="boefje", data={"k": "dispatched"})
    [dispatched] = services.task_pop(scheduler_id="boefje", filters={"k": "dispatched"})
    failed = services.task_push(scheduler_id="boefje", data={"k": "failed"})
    services.task_pop(scheduler_id="boefje", filters={"k": "failed"})
    services.task_fail(task_id=failed.id, retry=RetrySpec(policy="none", dead_letter=False))
    return {
        "queued": str(queued.id),
        "dispatched": str(dispatched.id),
        "token": dispatched.lease_token,
        "failed": str(failed.id),
    }


# name, method, url, body, runner's status, operator's status
ENDPOINTS = [
    ("scheduler-list", "get", "/api/schedulers/", None, 200, 200),
    ("scheduler-create", "post", "/api/schedulers/", {"id": "new"}, 403, 201),
    ("scheduler-retrieve", "get", "/api/schedulers/boefje/", None, 200, 200),
    ("scheduler-patch", "patch", "/api/schedulers/boefje/", {"max_queue_size": 5}, 403, 200),
    ("scheduler-delete", "delete", "/api/schedulers/spare/", None, 403, 204),
    ("scheduler-pause", "post", "/api/schedulers/boefje/pause/", None, 403, 200),
    ("scheduler-resume", "post", "/api/schedulers/boefje/resume/", None, 403, 200),
    ("push", "post", "/api/schedulers/boefje/push/", {"data": {"x": 1}}, 403, 201),
    ("pop", "post", "/api/schedulers/boefje/pop/", {"limit": 5}, 200, 200),
    ("task-list", "get", "/api/tasks/", None, 200, 200),
    ("task-retrieve", "get", "/api/tasks/{dispatched}/", None, 200, 200),
    (
        "task-patch",
        "patch",
        "/api/tasks/{dispatched}/",
        {"status": "RUNNING", "lease_token": "{token}"},
        200,
        200,
    ),
    (
        "heartbeat",
        "post",
        "/api/tasks/{dispatched}/heartbeat/",
        {"lease_token": "{token}"},
        200,
        200,
    ),
    ("cancel", "post", "/api/tasks/{queued}/cancel/", None, 403, 200),
    ("requeue", "post", "/api/tasks/{failed}/requeue/", None, 403, 200),
    ("events", "get", "/api/tasks/{dispatched}/events/", None, 200, 200),
    ("stats", "get", "/api/tasks/stats/", None, 200, 200),
    ("series", "get", "/api/tasks/series/", None, 200, 200),
    ("schema", "get", "/api/schema/", None, 200, 200),
]


Endpoint = tuple[str, str, str, Any, int, int]


def _endpoint_id(endpoint: Endpoint) -> str:
    return endpoint[0]


@pytest.mark.django_db
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_endpoint_id)
def test_permissions__anonymous_gets_401_and_changes_nothing(
    anon_client: APIClient, world: dict[str, str], endpoint: Endpoint
) -> None:
    _name, method, url, body, _runner, _operator = endpoint
    before = snapshot()
    response = call(anon_client, method, url.format(**world), fill(body, world))
    assert response.status_code == 401
    assert snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_endpoint_id)
def test_permissions__runner_reads_pops_and_reports_only(
    runner_client: APIClient, world: dict[str, str], endpoint: Endpoint
) -> None:
    _name, method, url, body, expected, _operator = endpoint
    before = snapshot()
    response = call(runner_client, method, url.format(**world), fill(body, world))
    assert response.status_code == expected, response.content[:300]
    if expected == 403:
        assert snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_endpoint_id)
def test_permissions__operator_can_do_everything(
    operator_client: APIClient, world: dict[str, str], endpoint: Endpoint
) -> None:
    _name, method, url, body, _runner, expected = endpoint
    response = call(operator_client, method, url.format(**world), fill(body, world))
    assert response.status_code == expected, response.content[:300]


@pytest.mark.django_db
def test_healthz__answers_without_auth(anon_client: APIClient) -> None:
    response = anon_client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok" and response.json()["checks"]["database"] is True


@pytest.mark.django_db
def test_schema__valid_openapi_3_with_the_queue_paths(runner_client: APIClient) -> None:
    response = runner_client.get("/api/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    for path in [
        "/api/schedulers/",
        "/api/schedulers/{id}/",
        "/api/schedulers/{id}/push/",
        "/api/schedulers/{id}/pop/",
        "/api/schedulers/{id}/pause/",
        "/api/tasks/",
        "/api/tasks/{id}/",
        "/api/tasks/{id}/heartbeat/",
        "/api/tasks/{id}/cancel/",
        "/api/tasks/{id}/requeue/",
        "/api/tasks/{id}/events/",
        "/api/tasks/stats/",
    ]:
        assert path in schema["paths"], path
    assert "patch" in schema["paths"]["/api/tasks/{id}/"]
    assert runner_client.get("/api/docs/").status_code == 200
