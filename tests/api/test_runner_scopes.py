"""Runner accounts limited to queues (DESIGN 9.1): `create_api_user NAME --role runner
--scheduler ID`. Such a runner sees, pops and reports only its queues: pop or push elsewhere is
403, a single queue or task elsewhere is 404, lists leave the others out. Operators, and
runners without grants, reach every queue."""

from __future__ import annotations

from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from rest_framework.test import APIClient

from tasks import services
from tasks.models import RunnerGrant, Scheduler
from tests.tasks.helpers import call, forbid_server_errors, snapshot

Tasks = dict[str, str]


@pytest.fixture(autouse=True)
def _no_server_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_server_errors(monkeypatch)


def _queue_with_tasks(scheduler_id: str) -> Tasks:
    """A pull queue with one QUEUED and one DISPATCHED task."""
    services.scheduler_create(id=scheduler_id, retry_jitter=False)
    queued = services.task_push(scheduler_id=scheduler_id, data={"k": "queued"})
    dispatched = services.task_push(scheduler_id=scheduler_id, data={"k": "dispatched"})
    services.task_pop(scheduler_id=scheduler_id, filters={"k": "dispatched"})
    return {"queued": str(queued.id), "dispatched": str(dispatched.id)}


@pytest.fixture
def queues(db: None) -> dict[str, Tasks]:
    return {"mine": _queue_with_tasks("mine"), "theirs": _queue_with_tasks("theirs")}


def _client_of(username: str, *args: str) -> tuple[User, APIClient]:
    """An account made by the command, signed in with the token it printed."""
    out = StringIO()
    call_command("create_api_user", username, *args, stdout=out)
    [key] = [line.split()[2] for line in out.getvalue().splitlines() if "API token:" in line]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return User.objects.get(username=username), client


@pytest.fixture
def scoped(queues: dict[str, Tasks]) -> APIClient:
    """A runner limited to `mine`, which may also push (a service that feeds its queue)."""
    user, client = _client_of("scoped", "--role", "runner", "--scheduler", "mine")
    user.user_permissions.add(Permission.objects.get(codename="add_task"))
    return client


def _with_lease(task: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    # Pops hand out a lease token where the queue has them (DESIGN 9.1); a report carries it.
    return {**body, "lease_token": task["lease_token"]} if "lease_token" in task else body


# name, method, url, body: what a runner may do on a queue, with `{q}` the queue and
# `{queued}` / `{dispatched}` its tasks.
ON_A_QUEUE = [
    ("scheduler-retrieve", "get", "/api/schedulers/{q}/", None),
    ("pop", "post", "/api/schedulers/{q}/pop/", {"limit": 5}),
    ("push", "post", "/api/schedulers/{q}/push/", {"data": {"x": 1}}),
    ("task-retrieve", "get", "/api/tasks/{queued}/", None),
    ("events", "get", "/api/tasks/{dispatched}/events/", None),
    ("task-patch", "patch", "/api/tasks/{dispatched}/", {"status": "RUNNING"}),
    ("heartbeat", "post", "/api/tasks/{dispatched}/heartbeat/", {}),
    ("release", "post", "/api/tasks/{dispatched}/release/", {"reason": "stopping"}),
]
REFUSED_ELSEWHERE = {"pop": 403, "push": 403}  # the rest: 404, as if it did not exist


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "method", "url", "body"), ON_A_QUEUE, ids=lambda v: v)
def test_scoped_runner__other_queues_refused_and_unchanged(
    scoped: APIClient, queues: dict[str, Tasks], name: str, method: str, url: str, body: Any
) -> None:
    before = snapshot()
    response = call(scoped, method, url.format(q="theirs", **queues["theirs"]), body)
    assert response.status_code == REFUSED_ELSEWHERE.get(name, 404), response.content
    assert snapshot() == before


@pytest.mark.django_db
def test_scoped_runner__own_queue_pop_report_heartbeat_release(
    scoped: APIClient, queues: dict[str, Tasks]
) -> None:
    assert scoped.get("/api/schedulers/mine/").status_code == 200
    assert (
        scoped.post("/api/schedulers/mine/push/", {"data": {"x": 1}}, format="json").status_code
        == 201
    )
    [task] = scoped.post("/api/schedulers/mine/pop/", {"limit": 1}, format="json").json()["results"]
    url = f"/api/tasks/{task['id']}/"
    assert scoped.get(url).status_code == 200
    assert scoped.get(url + "events/").status_code == 200
    assert scoped.post(url + "heartbeat/", _with_lease(task, {}), format="json").status_code == 200
    report = _with_lease(task, {"status": "RUNNING"})
    assert scoped.patch(url, report, format="json").status_code == 200
    release = _with_lease(task, {"reason": "stopping"})
    assert scoped.post(url + "release/", release, format="json").status_code == 200


@pytest.mark.django_db
def test_scoped_runner__lists_show_only_its_queues(
    scoped: APIClient, queues: dict[str, Tasks]
) -> None:
    schedulers = scoped.get("/api/schedulers/").json()["results"]
    assert [s["id"] for s in schedulers] == ["mine"]

    tasks = scoped.get("/api/tasks/").json()["results"]
    assert {t["id"] for t in tasks} == set(queues["mine"].values())
    assert scoped.get("/api/tasks/?scheduler=theirs").json()["results"] == []

    stats = scoped.get("/api/tasks/stats/").json()["results"]
    assert stats and {row["scheduler"] for row in stats} == {"mine"}
    assert scoped.get("/api/tasks/stats/?scheduler=theirs").json()["results"] == []


@pytest.mark.django_db
def test_scoped_runner__several_queues(queues: dict[str, Tasks]) -> None:
    services.scheduler_create(id="third")
    _user, client = _client_of("two", "--scheduler", "mine", "--scheduler", "theirs")
    schedulers = client.get("/api/schedulers/").json()["results"]
    assert sorted(s["id"] for s in schedulers) == ["mine", "theirs"]
    assert client.post("/api/schedulers/theirs/pop/", {}, format="json").status_code == 200
    assert client.post("/api/schedulers/third/pop/", {}, format="json").status_code == 403


@pytest.mark.django_db
def test_scoped_runner__deleting_its_queue_does_not_widen_its_reach(
    scoped: APIClient, queues: dict[str, Tasks]
) -> None:
    for task_id in queues["mine"].values():
        services.task_cancel(task_id=task_id)
    services.scheduler_delete(scheduler_id="mine")

    assert RunnerGrant.objects.filter(scheduler_id="mine").exists()
    assert scoped.get("/api/schedulers/").json()["results"] == []
    assert scoped.get("/api/tasks/").json()["results"] == []
    assert scoped.post("/api/schedulers/theirs/pop/", {}, format="json").status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize("role", ["runner", "operator"])
def test_unscoped_accounts__reach_every_queue(
    queues: dict[str, Tasks], role: str, make_client: Callable[..., APIClient]
) -> None:
    client = make_client(role)
    ids = {s["id"] for s in client.get("/api/schedulers/").json()["results"]}
    assert {"mine", "theirs"} <= ids
    assert client.post("/api/schedulers/theirs/pop/", {}, format="json").status_code == 200
    assert client.get(f"/api/tasks/{queues['theirs']['queued']}/").status_code == 200


@pytest.fixture
def make_client(db: None) -> Callable[..., APIClient]:
    def make(role: str) -> APIClient:
        user, client = _client_of(f"any-{role}", "--role", role)
        if role == "operator":
            # An operator is never limited, even by a grant it somehow holds.
            RunnerGrant.objects.create(user=user, scheduler=Scheduler.objects.get(id="mine"))
        return client

    return make
