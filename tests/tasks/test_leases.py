"""Leases belong to their holder (DESIGN §9.1): every hand-out mints a lease token, runners
must show it, a stale or foreign holder is refused, and requeue is for finished tasks only."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from tasks import dispatch, execution, housekeeping, services
from tasks.exceptions import TransitionRefused
from tasks.leases import OVERRIDE_NOTE, LeaseProof
from tasks.locks import MutexLock
from tasks.models import Scheduler, Task, TaskStatus
from tasks.registry import register
from tasks.retry import RetrySpec
from tests.tasks.helpers import T0, fresh, history, snapshot

S = TaskStatus
TOKEN = re.compile(r"^[0-9a-f]{64}$")

pytestmark = pytest.mark.django_db


def _pop(scheduler: str = "boefje", worker: str = "runner") -> Task:
    [task] = services.task_pop(scheduler_id=scheduler, worker=worker)
    return task


def _patch(client: APIClient, task: Task, **body: Any) -> Any:
    return client.patch(f"/api/tasks/{task.id}/", body, format="json")


def _celery_queue(scheduler_id: str = "work", handler: str = "demo.echo") -> Scheduler:
    return services.scheduler_create(id=scheduler_id, kind="celery", handler=handler)


# --- tokens -------------------------------------------------------------------------------------


def test_pop__each_hand_out_mints_a_fresh_token(push: Callable[..., Task]) -> None:
    task = push()
    first = _pop()
    services.task_fail(task_id=task.id, error="x", proof=LeaseProof.holder(first.lease_token))
    Task.objects.filter(id=task.id).update(not_before=timezone.now())  # the retry is due now
    second = _pop()

    assert TOKEN.match(first.lease_token) and TOKEN.match(second.lease_token)
    assert first.lease_token != second.lease_token
    assert fresh(task).lease_token == second.lease_token


def test_pop__batch_gives_every_task_its_own_token(push: Callable[..., Task]) -> None:
    for n in range(5):
        push(data={"n": n})
    popped = services.task_pop(scheduler_id="boefje", limit=5)
    assert len({task.lease_token for task in popped}) == 5


def test_pop__filtered_pop_mints_tokens_too(push: Callable[..., Task]) -> None:
    push(data={"org": "acme"})
    [task] = services.task_pop(scheduler_id="boefje", filters={"org": "acme"})
    assert TOKEN.match(task.lease_token)


def test_api_pop__returns_the_token_get_hides_it_from_runners(
    runner_client: APIClient, operator_client: APIClient, push: Callable[..., Task]
) -> None:
    push()
    popped = runner_client.post("/api/schedulers/boefje/pop/", {}, format="json").json()
    [task] = popped["results"]
    assert TOKEN.match(task["lease_token"])

    as_runner = runner_client.get(f"/api/tasks/{task['id']}/").json()
    listed = runner_client.get("/api/tasks/").json()["results"]
    assert "lease_token" not in as_runner and all("lease_token" not in t for t in listed)
    assert (
        operator_client.get(f"/api/tasks/{task['id']}/").json()["lease_token"]
        == (task["lease_token"])
    )


def test_schema__pop_documents_the_token(runner_client: APIClient) -> None:
    schema = runner_client.get("/api/schema/?format=json").json()
    popped = schema["components"]["schemas"]["PoppedTask"]["properties"]
    assert "lease_token" in popped
    assert "lease_token" not in schema["components"]["schemas"]["Task"]["properties"]


# --- runners must show their token -----------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "0" * 64, "é" * 10])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("", {"status": "COMPLETED", "result": {"stolen": True}}),
        ("", {"status": "RUNNING"}),
        ("", {"status": "FAILED", "error": "x"}),
        ("heartbeat/", {}),
        ("release/", {}),
    ],
)
def test_runner__without_the_right_token_is_409_and_changes_nothing(
    runner_client: APIClient,
    push: Callable[..., Task],
    token: str | None,
    path: str,
    body: dict[str, Any],
) -> None:
    push()
    task = _pop()
    if token is not None:
        body = {**body, "lease_token": token}
    before = snapshot()

    method = runner_client.patch if not path else runner_client.post
    response = method(f"/api/tasks/{task.id}/{path}", body, format="json")

    assert response.status_code in {400, 409}, response.content
    if token != "":  # a blank token is a bad request (400); the rest, a refusal
        assert response.status_code == 409 and "lease_token" in response.json()["detail"]
    assert snapshot() == before


def test_runner__with_its_token_reports(
    runner_client: APIClient, push: Callable[..., Task]
) -> None:
    push()
    task = _pop()
    token = {"lease_token": task.lease_token}

    beat = runner_client.post(f"/api/tasks/{task.id}/heartbeat/", token, format="json")
    assert beat.status_code == 200
    assert _patch(runner_client, task, status="RUNNING", **token).json()["status"] == "RUNNING"
    done = _patch(runner_client, task, status="COMPLETED", result={"n": 1}, **token)

    assert done.status_code == 200 and done.json()["status"] == "COMPLETED"
    assert fresh(task).lease_token == ""  # the attempt ended: the token never works again
    again = _patch(runner_client, task, status="COMPLETED", **token)
    assert again.status_code == 409


def test_runner__cannot_report_anothers_task_knowing_its_attempt(
    runner_client: APIClient, push: Callable[..., Task]
) -> None:
    push(data={"n": 1})
    push(data={"n": 2})
    mine, theirs = services.task_pop(scheduler_id="boefje", limit=2)
    before = snapshot()

    response = runner_client.post(
        f"/api/tasks/{theirs.id}/release/",
        {"attempt": theirs.attempts, "lease_token": mine.lease_token},
        format="json",
    )

    assert response.status_code == 409
    assert snapshot() == before


def test_operator__without_a_token_is_an_override_noted_in_the_event(
    operator_client: APIClient, push: Callable[..., Task]
) -> None:
    push()
    task = _pop()

    response = _patch(operator_client, task, status="COMPLETED", result={"by": "hand"})

    assert response.status_code == 200 and response.json()["status"] == "COMPLETED"
    assert history(task)[-1] == (S.DISPATCHED, S.COMPLETED, f"completed ({OVERRIDE_NOTE})")


def test_operator__with_a_wrong_token_is_refused_like_anyone(
    operator_client: APIClient, push: Callable[..., Task]
) -> None:
    push()
    task = _pop()
    response = _patch(operator_client, task, status="COMPLETED", lease_token="f" * 64)
    assert response.status_code == 409 and fresh(task).status == S.DISPATCHED


def test_stale_holder__after_reap_and_new_pop_is_refused(
    runner_client: APIClient, push: Callable[..., Task], time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(T0, tick=False)
    push()
    old = _pop(worker="old")
    time_machine.shift(timedelta(seconds=301))
    assert housekeeping.tasks_reap_expired() == 1
    time_machine.shift(timedelta(hours=2))  # past the retry's backoff
    new = _pop(worker="new")

    late = _patch(runner_client, old, status="COMPLETED", lease_token=old.lease_token)
    mine = _patch(runner_client, new, status="COMPLETED", lease_token=new.lease_token)

    assert late.status_code == 409
    assert mine.status_code == 200
    assert fresh(new).events.filter(to_status=S.COMPLETED).get().actor == "runner"


# --- requeue is for finished tasks ----------------------------------------------------------


def _leased(push: Callable[..., Task], status: str) -> Task:
    task = push()
    if status == S.QUEUED:
        return task
    popped = _pop()
    if status == S.RUNNING:
        services.task_start(task_id=task.id, proof=LeaseProof.holder(popped.lease_token))
    return fresh(task)


@pytest.mark.parametrize("status", [S.QUEUED, S.DISPATCHED, S.RUNNING])
def test_requeue__an_active_task_is_409_naming_its_status(
    operator_client: APIClient, push: Callable[..., Task], status: str
) -> None:
    task = _leased(push, status)
    before = snapshot()

    response = operator_client.post(f"/api/tasks/{task.id}/requeue/")

    assert response.status_code == 409
    assert status in response.json()["detail"] and response.json()["status"] == status
    assert snapshot() == before


def test_requeue__of_a_running_task_can_no_longer_hand_it_out_twice(
    push: Callable[..., Task],
) -> None:
    """The reported bug: requeue of a RUNNING task reset attempts to 0, so the next pop was
    attempt 1 again and the old holder's late report was accepted over the new holder's."""
    task = _leased(push, S.RUNNING)
    with pytest.raises(TransitionRefused):
        services.task_requeue(task_id=task.id)
    assert (fresh(task).status, fresh(task).attempts) == (S.RUNNING, 1)


# --- workers --------------------------------------------------------------------------------


def test_worker_claim__mints_a_token_and_names_the_worker() -> None:
    _celery_queue()
    pushed = services.task_push(scheduler_id="work")
    dispatch.dispatch_scheduler("work")
    assert fresh(pushed).lease_token == "" and fresh(pushed).worker == "dispatcher"

    claimed = services.task_start(task_id=pushed.id, attempt=1, actor="w1@host", mint_token=True)

    assert TOKEN.match(claimed.lease_token)
    assert fresh(pushed).worker == "w1@host"


def test_runner__cannot_take_a_celery_task_from_the_broker(
    runner_client: APIClient,
) -> None:
    _celery_queue()
    pushed = services.task_push(scheduler_id="work")
    dispatch.dispatch_scheduler("work")
    before = snapshot()

    for token in ({}, {"lease_token": "0" * 64}):
        response = _patch(runner_client, pushed, status="RUNNING", **token)
        assert response.status_code == 409
    assert snapshot() == before


def test_execute__a_locks_function_that_raises_is_a_failed_attempt(
    restore_handlers: None,
) -> None:
    def locks_for(data: dict[str, Any]) -> list[MutexLock]:
        return [MutexLock("org", data["org"])]  # KeyError on data without "org"

    register("test.locked", locks=locks_for, retry=RetrySpec(policy="none", dead_letter=False))(
        lambda ctx: "ran"
    )
    _celery_queue(handler="test.locked")
    pushed = services.task_push(scheduler_id="work", data={"no_org": 1})
    dispatch.dispatch_scheduler("work")

    assert execution.execute(pushed.id, 1, worker="w1") == "failed"

    task = fresh(pushed)
    assert (task.status, task.error) == (S.FAILED, "KeyError: 'org'")
    assert task.lease_token == ""


# --- lost broker messages -------------------------------------------------------------------


def test_hand_back_unclaimed__after_the_claim_timeout_sends_it_again(
    time_machine: TimeMachineFixture,
) -> None:
    time_machine.move_to(T0, tick=False)
    _celery_queue()
    pushed = services.task_push(scheduler_id="work")
    dispatch.dispatch_scheduler("work")  # its message is lost: no worker claims it
    time_machine.shift(timedelta(seconds=settings.TASK_CLAIM_TIMEOUT_SECONDS - 1))
    assert dispatch.hand_back_unclaimed() == 0

    time_machine.shift(timedelta(seconds=2))
    sent = dispatch.dispatch_all()

    task = fresh(pushed)
    assert sent["work"] == 1
    assert (task.status, task.attempts) == (S.DISPATCHED, 1)  # sent again, no attempt spent
    assert [note for _f, _t, note in history(task)] == [
        "pushed",
        "dispatched",
        f"handed back, attempt not spent: not claimed by a worker within "
        f"{settings.TASK_CLAIM_TIMEOUT_SECONDS} s",
        "dispatched",
    ]


def test_hand_back_unclaimed__leaves_claimed_and_pull_tasks_alone(
    push: Callable[..., Task], time_machine: TimeMachineFixture
) -> None:
    time_machine.move_to(T0, tick=False)
    push()
    _pop()  # a pull task: its runner may take the whole lease
    _celery_queue()
    running = services.task_push(scheduler_id="work")
    dispatch.dispatch_scheduler("work")
    services.task_start(task_id=running.id, attempt=1, mint_token=True)
    time_machine.shift(timedelta(seconds=settings.TASK_CLAIM_TIMEOUT_SECONDS + 1))

    assert dispatch.hand_back_unclaimed() == 0


def test_reaper__an_unclaimed_celery_task_is_handed_back_not_failed(
    time_machine: TimeMachineFixture,
) -> None:
    time_machine.move_to(T0, tick=False)
    _celery_queue()
    pushed = services.task_push(scheduler_id="work")
    dispatch.dispatch_scheduler("work")
    time_machine.shift(timedelta(seconds=settings.TASK_CLAIM_TIMEOUT_SECONDS + 1))

    assert housekeeping.tasks_reap_expired() == 1

    task = fresh(pushed)
    assert (task.status, task.attempts, task.error) == (S.QUEUED, 0, "")
