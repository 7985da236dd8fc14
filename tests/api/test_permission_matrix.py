"""Who may call what, across the whole site: anonymous, a runner, an operator.

tests/tasks/test_api_permissions.py has the queue endpoints (schedulers, tasks); this table has
every other route, and test_every_api_operation_is_in_a_matrix keeps the two together complete
against the OpenAPI schema. Every refused call must change nothing.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient

from tests.api.conftest import snapshot
from tests.tasks.helpers import call, fill, forbid_server_errors
from tests.tasks.test_api_permissions import ENDPOINTS as QUEUE_ENDPOINTS

# name, method, url, body, then the status for anonymous, runner, operator. Runners may read
# queues and tasks, pop, report, heartbeat and release; nothing else.
MATRIX: list[tuple[str, str, str, Any, int, int, int]] = [
    # tasks: the route the queue matrix has not
    (
        "task-release",
        "post",
        "/api/tasks/{dispatched}/release/",
        {"attempt": 1, "lease_token": "{token}"},
        401,
        200,
        200,
    ),
    (
        "task-report",
        "post",
        "/api/tasks/report/",
        {"reports": [{"id": "{dispatched}", "lease_token": "{token}", "status": "RUNNING"}]},
        401,
        200,
        200,
    ),
    # PUT is not part of the API (PATCH is): refused by permission first, then 405.
    ("scheduler-put", "put", "/api/schedulers/boefje/", {"id": "boefje"}, 401, 403, 405),
    # schedules
    ("schedule-list", "get", "/api/schedules/", None, 401, 403, 200),
    (
        "schedule-create",
        "post",
        "/api/schedules/",
        {"scheduler": "boefje", "interval_seconds": 60, "hash": "new"},
        401,
        403,
        201,
    ),
    ("schedule-retrieve", "get", "/api/schedules/{schedule}/", None, 401, 403, 200),
    ("schedule-patch", "patch", "/api/schedules/{schedule}/", {"priority": 3}, 401, 403, 200),
    ("schedule-delete", "delete", "/api/schedules/{schedule}/", None, 401, 403, 204),
    ("schedule-pause", "post", "/api/schedules/{schedule}/pause/", None, 401, 403, 200),
    ("schedule-resume", "post", "/api/schedules/{paused_schedule}/resume/", None, 401, 403, 200),
    ("schedule-trigger", "post", "/api/schedules/{schedule}/trigger/", None, 401, 403, 201),
    # virtual organisations
    ("vo-list", "get", "/api/vos/", None, 401, 403, 200),
    ("vo-create", "post", "/api/vos/", {"name": "atlas"}, 401, 403, 201),
    ("vo-retrieve", "get", "/api/vos/lhcb/", None, 401, 403, 200),
    ("vo-patch", "patch", "/api/vos/lhcb/", {"enabled": False}, 401, 403, 200),
    # compute elements
    ("ce-list", "get", "/api/compute-elements/", None, 401, 403, 200),
    (
        "ce-create",
        "post",
        "/api/compute-elements/",
        {"name": "ce-new", "capacity": 2, "reliability": 1.0, "vos": ["lhcb"]},
        401,
        403,
        201,
    ),
    ("ce-retrieve", "get", "/api/compute-elements/ce-a/", None, 401, 403, 200),
    ("ce-patch", "patch", "/api/compute-elements/ce-a/", {"capacity": 5}, 401, 403, 200),
    ("ce-delete", "delete", "/api/compute-elements/ce-b/", None, 401, 403, 204),
    ("ce-drain", "post", "/api/compute-elements/ce-a/drain/", None, 401, 403, 200),
    ("ce-ban", "post", "/api/compute-elements/ce-a/ban/", None, 401, 403, 200),
    ("ce-activate", "post", "/api/compute-elements/ce-c/activate/", None, 401, 403, 200),
    ("ce-submit", "post", "/api/compute-elements/ce-a/submit/", {"vo": "lhcb"}, 401, 403, 201),
    # pilots
    ("pilot-list", "get", "/api/pilots/", None, 401, 403, 200),
    ("pilot-retrieve", "get", "/api/pilots/{pilot}/", None, 401, 403, 200),
    ("pilot-summary", "get", "/api/pilots/summary/", None, 401, 403, 200),
    # who does the work, and health
    ("worker-list", "get", "/api/workers/", None, 401, 403, 200),
    ("health", "get", "/api/health/", None, 401, 200, 200),
    # the rest of the site
    ("api-root", "get", "/api/", None, 401, 200, 200),
    ("schema", "get", "/api/schema/", None, 401, 200, 200),
    ("docs", "get", "/api/docs/", None, 401, 200, 200),
    ("metrics", "get", "/metrics", None, 401, 200, 200),
    ("healthz", "get", "/healthz", None, 200, 200, 200),
]

Row = tuple[str, str, str, Any, int, int, int]
ROLES = {"anonymous": 4, "runner": 5, "operator": 6}


def _row_id(row: Row) -> str:
    return row[0]


@pytest.fixture(autouse=True)
def _no_server_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_server_errors(monkeypatch)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("row", MATRIX, ids=_row_id)
def test_matrix(request: pytest.FixtureRequest, world: dict[str, str], role: str, row: Row) -> None:
    name, method, url, body = row[:4]
    expected = row[ROLES[role]]
    client = request.getfixturevalue(f"{role.replace('anonymous', 'anon')}_client")
    before = snapshot()

    response = call(client, method, url.format(**world), fill(body, world))

    assert response.status_code == expected, (name, role, response.content[:300])
    if expected >= 400:
        assert snapshot() == before, f"{name} refused for {role} but changed something"
    if expected == 401:
        assert response["WWW-Authenticate"] == "Token"


# --- the dashboard: a page, with the session of a logged-in user ------------------------------


@pytest.mark.django_db
def test_dashboard__anonymous_is_sent_to_the_login_page(world: dict[str, str]) -> None:
    response = Client().get("/")
    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/"


@pytest.mark.django_db
@pytest.mark.parametrize("role", ["runner", "operator"])
def test_dashboard__any_logged_in_user_sees_it(
    request: pytest.FixtureRequest, world: dict[str, str], role: str
) -> None:
    """login_required only: no role is needed (runners cannot log in to the admin, the only
    way to a session, since create_api_user makes them without staff status)."""
    user: User = request.getfixturevalue(role)
    client = Client()
    client.force_login(user)
    before = snapshot()
    response = client.get("/")
    assert response.status_code == 200
    assert b"boefje" in response.content
    assert snapshot() == before


# --- completeness -------------------------------------------------------------------------------

_ACTIONS = {"stats", "summary", "report", "series"}


def _template(url: str) -> str:
    """/api/compute-elements/ce-a/drain/ -> /api/compute-elements/{name}/drain/"""
    match = re.fullmatch(r"/api/([a-z-]+)/([^/]+)/(.*)", url)
    if match is None or match[2] in _ACTIONS:
        return url
    kind, _lookup, rest = match.groups()
    key = "name" if kind in {"vos", "compute-elements"} else "id"
    return f"/api/{kind}/{{{key}}}/{rest}"


@pytest.mark.django_db
def test_every_api_operation_is_in_a_matrix(runner_client: APIClient) -> None:
    schema = runner_client.get("/api/schema/?format=json").json()
    operations = {
        (method.upper(), path)
        for path, methods in schema["paths"].items()
        for method in methods
        if method in {"get", "post", "put", "patch", "delete"}
    }
    rows = [(row[1], row[2]) for row in MATRIX] + [(row[1], row[2]) for row in QUEUE_ENDPOINTS]
    covered = {(method.upper(), _template(url)) for method, url in rows}
    assert operations - covered == set()
