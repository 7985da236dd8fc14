"""The REST API of schedulers and tasks (DESIGN 6.1), through DRF's APIClient: bodies, status
codes and bad input. Permissions, health and schema are in test_api_permissions.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from tasks import services
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tests.tasks.helpers import (
    T0,
    call,
    forbid_server_errors,
)

S = TaskStatus
MISSING = "7d1e2a9c-0000-4000-8000-000000000000"
MALFORMED = [
    "not-a-uuid",
    "0123456789abcdef0123456789abcdef0123",  # 36 hex digits
    "--------------------------------",
    "0123456789abcdef0123456789abcdeg",
]


@pytest.fixture(autouse=True)
def _no_server_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_server_errors(monkeypatch)


# --- push ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_push__201_with_the_task(operator_client: APIClient, scheduler: Scheduler) -> None:
    body = {"data": {"org": "a"}, "priority": 3, "hash": "h1"}
    response = operator_client.post("/api/schedulers/boefje/push/", body, format="json")
    assert response.status_code == 201
    task = response.json()
    assert {
        k: task[k] for k in ("scheduler", "status", "data", "priority", "hash", "attempts")
    } == {
        "scheduler": "boefje",
        "status": "QUEUED",
        "data": {"org": "a"},
        "priority": 3,
        "hash": "h1",
        "attempts": 0,
    }
    assert Task.objects.get(id=task["id"]).data == {"org": "a"}


@pytest.mark.django_db
def test_push__409_duplicate_names_the_existing_task(
    operator_client: APIClient, scheduler: Scheduler
) -> None:
    first = operator_client.post("/api/schedulers/boefje/push/", {"hash": "h"}, format="json")
    again = operator_client.post("/api/schedulers/boefje/push/", {"hash": "h"}, format="json")
    assert again.status_code == 409
    assert again.json()["existing_id"] == first.json()["id"]
    assert Task.objects.count() == 1


@pytest.mark.django_db
def test_push__429_when_full(
    operator_client: APIClient, make_scheduler: Callable[..., Scheduler]
) -> None:
    make_scheduler("small", max_queue_size=1)
    assert operator_client.post("/api/schedulers/small/push/", {}, format="json").status_code == 201
    response = operator_client.post("/api/schedulers/small/push/", {}, format="json")
    assert response.status_code == 429 and "full" in response.json()["detail"]
    assert Task.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"data": [1, 2]}, "data"),
        ({"data": "text"}, "data"),
        ({"priority": 2**31}, "priority"),
        ({"priority": -(2**31) - 1}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"hash": "x" * 65}, "hash"),
        ({"not_before": "tomorrow"}, "not_before"),
    ],
)
def test_push__400_names_the_field(
    operator_client: APIClient, scheduler: Scheduler, body: dict[str, Any], field: str
) -> None:
    response = operator_client.post("/api/schedulers/boefje/push/", body, format="json")
    assert response.status_code == 400 and field in response.json()
    assert not Task.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/api/schedulers/boefje/push/", "/api/schedulers/boefje/pop/"])
def test_post__non_json_body_is_400(
    operator_client: APIClient, scheduler: Scheduler, url: str
) -> None:
    response = operator_client.post(url, data="{not json", content_type="application/json")
    assert response.status_code == 400 and "JSON" in response.json()["detail"]


# Literal JSON a parser accepts but the database cannot hold: 1e400 parses to inf, "\ud800"
# to a lone surrogate (a 500 on SQLite, an unnamed 400 on PostgreSQL before they were refused).
UNSTORABLE_JSON = ['{"x": 1e400}', "[-1e400]", '{"x": "\\ud800"}', '{"\\udfff": 1}']


@pytest.mark.django_db
@pytest.mark.parametrize("value", UNSTORABLE_JSON)
def test_push__a_value_the_database_cannot_hold_is_400_naming_data(
    operator_client: APIClient, scheduler: Scheduler, value: str
) -> None:
    url = "/api/schedulers/boefje/push/"
    raw = '{"data": {"v": ' + value + "}}"
    single = operator_client.post(url, data=raw, content_type="application/json")
    batch = operator_client.post(
        url, data=f'[{{"data": {{}}}}, {raw}]', content_type="application/json"
    )
    assert single.status_code == 400 and "data" in single.json(), single.content
    assert [item["status"] for item in batch.json()["results"]] == [201, 400]
    assert "data" in batch.json()["results"][1]["errors"]
    assert Task.objects.count() == 1  # the batch's valid item only


@pytest.mark.django_db
@pytest.mark.parametrize("value", UNSTORABLE_JSON)
def test_report__a_result_the_database_cannot_hold_is_400_naming_result(
    operator_client: APIClient, runner_client: APIClient, scheduler: Scheduler, value: str
) -> None:
    operator_client.post("/api/schedulers/boefje/push/", {}, format="json")
    popped = runner_client.post("/api/schedulers/boefje/pop/", {}, format="json")
    task = popped.json()["results"][0]
    token = task["lease_token"]
    raw = '{"status": "COMPLETED", "lease_token": "' + token + '", "result": ' + value + "}"
    response = runner_client.patch(
        f"/api/tasks/{task['id']}/", data=raw, content_type="application/json"
    )
    assert response.status_code == 400 and "result" in response.json(), response.content
    assert Task.objects.get().status == TaskStatus.DISPATCHED


# --- pop -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_pop__dispatches_with_filters_and_empty_when_nothing_due(
    runner_client: APIClient, push: Callable[..., Task]
) -> None:
    wanted = push(data={"org": "a", "boefje": {"id": "dns"}})
    push(data={"org": "b"})
    body = {"limit": 10, "filters": {"org": ["a", "c"], "boefje.id": "dns"}}

    response = runner_client.post("/api/schedulers/boefje/pop/", body, format="json")

    assert response.status_code == 200
    [task] = response.json()["results"]
    assert (task["id"], task["status"], task["attempts"]) == (str(wanted.id), "DISPATCHED", 1)
    assert task["lease_expires_at"] is not None
    again = runner_client.post("/api/schedulers/boefje/pop/", body, format="json")
    assert again.json() == {"results": []}


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": "many"},
        {"filters": {"a b": 1}},
        {"filters": {"$where": 1}},
        {"filters": {"a..b": 1}},
        {"filters": {"org": {"nested": 1}}},
        {"filters": {"org": []}},
        {"filters": {"org": None}},
        {"filters": ["org"]},
        {"filters": {f"k{i}": 1 for i in range(11)}},
    ],
)
def test_pop__400_names_the_field(
    runner_client: APIClient, push: Callable[..., Task], body: dict[str, Any]
) -> None:
    task = push(data={"org": "a"})
    response = runner_client.post("/api/schedulers/boefje/pop/", body, format="json")
    assert response.status_code == 400
    assert set(response.json()) == set(body)
    assert Task.objects.get(id=task.id).status == S.QUEUED


@pytest.mark.django_db
def test_pause_resume__pop_returns_nothing_while_paused(
    operator_client: APIClient, push: Callable[..., Task]
) -> None:
    task = push()
    paused = operator_client.post("/api/schedulers/boefje/pause/")
    assert paused.status_code == 200 and paused.json()["paused"] is True
    pop = operator_client.post("/api/schedulers/boefje/pop/", {}, format="json")
    assert pop.json() == {"results": []}

    resumed = operator_client.post("/api/schedulers/boefje/resume/")
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    pop = operator_client.post("/api/schedulers/boefje/pop/", {}, format="json")
    assert [t["id"] for t in pop.json()["results"]] == [str(task.id)]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("get", ""),
        ("patch", ""),
        ("delete", ""),
        ("post", "pause/"),
        ("post", "resume/"),
        ("post", "push/"),
        ("post", "pop/"),
    ],
)
def test_scheduler__404_unknown(operator_client: APIClient, method: str, suffix: str) -> None:
    response = call(operator_client, method, f"/api/schedulers/nope/{suffix}", {})
    assert response.status_code == 404
    bad = call(operator_client, method, f"/api/schedulers/Bad%20Id/{suffix}", {})
    assert bad.status_code == 404


# --- task reports ----------------------------------------------------------------------------


@pytest.fixture
def dispatched(push: Callable[..., Task]) -> Task:
    """A popped task, as its runner got it: with its lease token."""
    push(data={"n": 1})
    [task] = services.task_pop(scheduler_id="boefje")
    return task


@pytest.mark.django_db
def test_patch__running_then_completed(runner_client: APIClient, dispatched: Task) -> None:
    url = f"/api/tasks/{dispatched.id}/"
    token = dispatched.lease_token
    running = runner_client.patch(
        url, {"status": "RUNNING", "attempt": 1, "lease_token": token}, format="json"
    )
    assert running.status_code == 200 and running.json()["status"] == "RUNNING"

    done = runner_client.patch(
        url, {"status": "COMPLETED", "result": {"n": 2}, "lease_token": token}, format="json"
    )

    assert done.status_code == 200
    assert (done.json()["status"], done.json()["result"]) == ("COMPLETED", {"n": 2})
    assert runner_client.get(url).json()["status"] == "COMPLETED"


@pytest.mark.django_db
def test_patch__failed_is_retried(runner_client: APIClient, dispatched: Task) -> None:
    response = runner_client.patch(
        f"/api/tasks/{dispatched.id}/",
        {"status": "FAILED", "error": "boom", "lease_token": dispatched.lease_token},
        format="json",
    )
    body = response.json()
    assert response.status_code == 200
    assert (body["status"], body["error"], body["attempts"]) == ("QUEUED", "boom", 1)
    assert datetime.fromisoformat(body["not_before"]) > datetime.fromisoformat(body["modified_at"])


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body",
    [
        {"status": "DEAD"},
        {"status": "QUEUED"},
        {"status": "CANCELLED"},
        {},
        {"status": "COMPLETED", "attempt": 0},
        {"status": "FAILED", "error": "x" * 10_001},
    ],
)
def test_patch__400_names_the_field(
    runner_client: APIClient, dispatched: Task, body: dict[str, Any]
) -> None:
    response = runner_client.patch(f"/api/tasks/{dispatched.id}/", body, format="json")
    assert response.status_code == 400
    assert set(response.json()) <= {"status", "attempt", "error"} and response.json()
    assert Task.objects.get(id=dispatched.id).status == S.DISPATCHED


@pytest.mark.django_db
def test_patch__non_json_body_is_400(runner_client: APIClient, dispatched: Task) -> None:
    response = runner_client.patch(
        f"/api/tasks/{dispatched.id}/", data="status=RUNNING", content_type="application/json"
    )
    assert response.status_code == 400


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("before", "report"),
    [
        (S.QUEUED, "COMPLETED"),
        (S.QUEUED, "RUNNING"),
        (S.COMPLETED, "RUNNING"),
        (S.QUEUED, "FAILED"),
    ],
)
def test_patch__409_illegal_transition_names_both_states(
    runner_client: APIClient, push: Callable[..., Task], before: str, report: str
) -> None:
    task = push()
    if before == S.COMPLETED:
        services.task_pop(scheduler_id="boefje")
        services.task_complete(task_id=task.id)
    events = TaskEvent.objects.filter(task_id=task.id).count()

    response = runner_client.patch(f"/api/tasks/{task.id}/", {"status": report}, format="json")

    assert response.status_code == 409
    assert before in response.json()["detail"] and report in response.json()["detail"]
    assert response.json()["status"] == before
    assert Task.objects.get(id=task.id).status == before
    assert TaskEvent.objects.filter(task_id=task.id).count() == events


@pytest.mark.django_db
def test_patch__stale_attempt_is_409(runner_client: APIClient, dispatched: Task) -> None:
    response = runner_client.patch(
        f"/api/tasks/{dispatched.id}/", {"status": "COMPLETED", "attempt": 2}, format="json"
    )
    assert response.status_code == 409
    assert Task.objects.get(id=dispatched.id).status == S.DISPATCHED


@pytest.mark.django_db
def test_heartbeat__extends_then_409_after_cancel(
    runner_client: APIClient, operator_client: APIClient, dispatched: Task
) -> None:
    url = f"/api/tasks/{dispatched.id}/heartbeat/"
    token = {"lease_token": dispatched.lease_token}
    runner_client.patch(
        f"/api/tasks/{dispatched.id}/", {"status": "RUNNING", **token}, format="json"
    )
    beat = runner_client.post(url, {"lease_seconds": 3600, **token}, format="json")
    assert beat.status_code == 200
    lease = Task.objects.get(id=dispatched.id).lease_expires_at
    assert lease is not None and lease > datetime.now(UTC) + timedelta(minutes=59)

    cancel = operator_client.post(f"/api/tasks/{dispatched.id}/cancel/")
    assert cancel.status_code == 200
    assert cancel.json()["status"] == "RUNNING" and cancel.json()["cancel_requested_at"]

    refused = runner_client.post(url, token, format="json")
    assert refused.status_code == 409 and refused.json()["status"] == "CANCELLED"
    done = runner_client.patch(
        f"/api/tasks/{dispatched.id}/", {"status": "FAILED", **token}, format="json"
    )
    assert done.json()["status"] == "CANCELLED"


@pytest.mark.django_db
@pytest.mark.parametrize("body", [{"lease_seconds": 0}, {"lease_seconds": 86401}, {"attempt": "x"}])
def test_heartbeat__400(runner_client: APIClient, dispatched: Task, body: dict[str, Any]) -> None:
    response = runner_client.post(f"/api/tasks/{dispatched.id}/heartbeat/", body, format="json")
    assert response.status_code == 400 and set(response.json()) == set(body)


@pytest.mark.django_db
def test_heartbeat__409_on_a_queued_task(
    runner_client: APIClient, push: Callable[..., Task]
) -> None:
    task = push()
    assert runner_client.post(f"/api/tasks/{task.id}/heartbeat/").status_code == 409


# --- cancel, requeue, events -----------------------------------------------------------------


@pytest.mark.django_db
def test_cancel_and_requeue(operator_client: APIClient, push: Callable[..., Task]) -> None:
    task = push(hash="h")
    cancel = operator_client.post(f"/api/tasks/{task.id}/cancel/")
    assert cancel.status_code == 200 and cancel.json()["status"] == "CANCELLED"
    again = operator_client.post(f"/api/tasks/{task.id}/cancel/")
    assert again.status_code == 409 and "CANCELLED" in again.json()["detail"]

    other = push(hash="h")
    duplicate = operator_client.post(f"/api/tasks/{task.id}/requeue/")
    assert duplicate.status_code == 409 and duplicate.json()["existing_id"] == str(other.id)
    operator_client.post(f"/api/tasks/{other.id}/cancel/")

    requeued = operator_client.post(f"/api/tasks/{task.id}/requeue/")
    assert requeued.status_code == 200
    assert (requeued.json()["status"], requeued.json()["attempts"]) == ("QUEUED", 0)
    assert operator_client.post(f"/api/tasks/{task.id}/requeue/").status_code == 409


@pytest.mark.django_db
def test_events__transition_history(runner_client: APIClient, dispatched: Task) -> None:
    runner_client.patch(
        f"/api/tasks/{dispatched.id}/",
        {"status": "RUNNING", "lease_token": dispatched.lease_token},
        format="json",
    )
    response = runner_client.get(f"/api/tasks/{dispatched.id}/events/")
    assert response.status_code == 200
    assert [(e["from_status"], e["to_status"], e["note"]) for e in response.json()] == [
        ("", "QUEUED", "pushed"),
        ("QUEUED", "DISPATCHED", "popped"),
        ("DISPATCHED", "RUNNING", "started"),
    ]
    assert response.json()[-1]["actor"] == "runner"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("get", ""),
        ("patch", ""),
        ("post", "heartbeat/"),
        ("post", "cancel/"),
        ("post", "requeue/"),
        ("get", "events/"),
    ],
)
@pytest.mark.parametrize("task_id", [MISSING, *MALFORMED])
def test_task__404_unknown_or_malformed_id(
    operator_client: APIClient, method: str, suffix: str, task_id: str
) -> None:
    body = {"status": "COMPLETED"} if method == "patch" else {}
    response = call(operator_client, method, f"/api/tasks/{task_id}/{suffix}", body)
    assert response.status_code == 404


# --- list, pagination, stats -----------------------------------------------------------------


@pytest.mark.django_db
def test_list__filters(
    runner_client: APIClient,
    push: Callable[..., Task],
    make_scheduler: Callable[..., Scheduler],
    time_machine: TimeMachineFixture,
) -> None:
    make_scheduler("other")
    time_machine.move_to(T0, tick=False)
    a = push(hash="h1")
    time_machine.shift(timedelta(hours=1))
    b = push()
    services.task_pop(scheduler_id="boefje")  # a is DISPATCHED
    time_machine.shift(timedelta(hours=1))
    c = push(scheduler_id="other")

    def ids(query: str) -> set[str]:
        response = runner_client.get(f"/api/tasks/?{query}")
        assert response.status_code == 200, response.content
        return {t["id"] for t in response.json()["results"]}

    assert ids("scheduler=other") == {str(c.id)}
    assert ids("status=QUEUED") == {str(b.id), str(c.id)}
    assert ids("status=DISPATCHED&status=COMPLETED") == {str(a.id)}
    assert ids("hash=h1") == {str(a.id)}
    after, before = (
        (T0 + timedelta(minutes=30)).isoformat(),
        (T0 + timedelta(minutes=90)).isoformat(),
    )
    assert ids(f"created_after={after.replace('+', '%2B')}") == {str(b.id), str(c.id)}
    assert ids(f"created_before={before.replace('+', '%2B')}") == {str(a.id), str(b.id)}
    assert ids("scheduler=boefje&status=QUEUED") == {str(b.id)}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("created_after=yesterday", "created_after"),
        ("created_before=2030-13-45", "created_before"),
        ("status=BOGUS", "status"),
    ],
)
def test_list__bad_filter_is_400(runner_client: APIClient, query: str, field: str) -> None:
    response = runner_client.get(f"/api/tasks/?{query}")
    assert response.status_code == 400 and field in response.json()


@pytest.mark.django_db
def test_list__cursor_pagination(runner_client: APIClient, push: Callable[..., Task]) -> None:
    pushed = [push(data={"i": i}) for i in range(5)]
    seen: list[str] = []
    url: str | None = "/api/tasks/?page_size=2"
    pages = 0
    while url:
        response = runner_client.get(url)
        body = response.json()
        assert response.status_code == 200 and "count" not in body
        assert len(body["results"]) <= 2
        seen += [t["id"] for t in body["results"]]
        url = body["next"]
        pages += 1
    assert pages == 3
    assert seen == [str(t.id) for t in reversed(pushed)], "newest first, each once"


@pytest.mark.django_db
def test_stats__per_hour_and_scheduler(runner_client: APIClient, dispatched: Task) -> None:
    response = runner_client.get("/api/tasks/stats/?scheduler=boefje&hours=2")
    assert response.status_code == 200
    counts = {(r["scheduler"], r["status"]): r["count"] for r in response.json()["results"]}
    assert counts == {("boefje", "QUEUED"): 1, ("boefje", "DISPATCHED"): 1}
    assert runner_client.get("/api/tasks/stats/?scheduler=other").json() == {"results": []}


@pytest.mark.django_db
@pytest.mark.parametrize("hours", ["0", "abc", "745", "-1"])
def test_stats__bad_hours_is_400(runner_client: APIClient, hours: str) -> None:
    response = runner_client.get(f"/api/tasks/stats/?hours={hours}")
    assert response.status_code == 400 and "hours" in response.json()
