"""How many SQL statements each hot HTTP path runs, pinned per database (issue 12), so that
one more cannot creep in unnoticed: a runner's pop, single and batch report, an operator's
push. Counts, not timings. Django's connection health check (a `SELECT 1` sent past the
query log) is not counted: it runs once per request whatever the view does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from tasks import accounts, services, workers
from tasks.models import Scheduler

# Per vendor: statements of one request in the steady state (the runner already seen), inside the
# test's transaction (an atomic block is a SAVEPOINT and its RELEASE here). PostgreSQL: a pop is
# the token check (which also reads the permissions and grants) and the pop statement; an empty
# pop reads the scheduler to say why; a push is the token and one statement (the insert, its
# event and the NOTIFY waking long polls; the scheduler row is the one the warm-up push read,
# which that statement re-checks); a limited runner's report is the token, the
# task-in-my-queues check and the report statement; a batch of 10 reports is the token, one
# visibility read and one statement per report. SQLite runs each write as its ORM steps (no data-
# modifying CTEs).
POP = {"postgresql": 2, "sqlite": 10}
POP_EMPTY = {"postgresql": 3, "sqlite": 9}
PUSH = {"postgresql": 2, "sqlite": 11}
REPORT = {"postgresql": 3, "sqlite": 11}
BATCH_REPORT = {"postgresql": 12, "sqlite": 56}


@pytest.fixture
def limited_runner(runner: User, runner_client: APIClient, scheduler: Scheduler) -> APIClient:
    """A runner account limited to its queue (a grant): the costlier permission case."""
    accounts.runner_grants_set(user=runner, scheduler_ids=[scheduler.id])
    return runner_client


@pytest.fixture(autouse=True)
def _steady_runner_notes(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    """The warm-up call writes the runner's liveness note and the measured one does not, on
    any machine: the note is written at most once per RUNNER_SEEN_WRITE_SECONDS per runner and
    queue per process, and that memory outlives a test. Left as it was, an earlier test's note
    made the warm-up skip its write and, 5 s after that test, the measured call make it (a CI
    failure: 10 more statements)."""
    monkeypatch.setattr(workers, "_runner_writes", {})
    settings.RUNNER_SEEN_WRITE_SECONDS = 3600


def _statements(request: Callable[[], Any]) -> tuple[int, Any]:
    request()  # the warm-up: the first call of a runner records it (workers.runner_seen)
    with CaptureQueriesContext(connection) as captured:
        response = request()
    return len(captured.captured_queries), response


def _pop(client: APIClient) -> dict[str, Any]:
    response = client.post("/api/schedulers/boefje/pop/", {}, format="json")
    assert response.status_code == 200
    return response.data


@pytest.mark.django_db
def test_api_queries__pop(limited_runner: APIClient) -> None:
    for _ in range(2):
        services.task_push(scheduler_id="boefje")
    count, data = _statements(lambda: _pop(limited_runner))
    assert len(data["results"]) == 1
    assert count == POP[connection.vendor]


@pytest.mark.django_db
def test_api_queries__pop_of_an_empty_queue(limited_runner: APIClient) -> None:
    count, data = _statements(lambda: _pop(limited_runner))
    assert data["results"] == []
    assert count == POP_EMPTY[connection.vendor]


@pytest.mark.django_db
def test_api_queries__push(operator_client: APIClient, scheduler: Scheduler) -> None:
    def push() -> Any:
        response = operator_client.post("/api/schedulers/boefje/push/", {"data": {}}, format="json")
        assert response.status_code == 201
        return response

    count, _ = _statements(push)
    assert count == PUSH[connection.vendor]


@pytest.mark.django_db
def test_api_queries__single_report(limited_runner: APIClient) -> None:
    for _ in range(2):
        services.task_push(scheduler_id="boefje")

    def report() -> Any:
        [task] = _pop(limited_runner)["results"]
        body = {"status": "COMPLETED", "lease_token": task["lease_token"]}
        response = limited_runner.patch(f"/api/tasks/{task['id']}/", body, format="json")
        assert response.status_code == 200
        return response

    count, _ = _statements(report)
    assert count - POP[connection.vendor] == REPORT[connection.vendor]


@pytest.mark.django_db
def test_api_queries__batch_report_of_ten(limited_runner: APIClient) -> None:
    for _ in range(20):
        services.task_push(scheduler_id="boefje")

    def report() -> Any:
        popped = limited_runner.post("/api/schedulers/boefje/pop/", {"limit": 10}, format="json")
        reports = [
            {"id": task["id"], "lease_token": task["lease_token"], "status": "COMPLETED"}
            for task in popped.data["results"]
        ]
        response = limited_runner.post("/api/tasks/report/", {"reports": reports}, format="json")
        assert [result["status"] for result in response.data["results"]] == [200] * 10
        return response

    count, _ = _statements(report)
    assert count - POP[connection.vendor] == BATCH_REPORT[connection.vendor]
