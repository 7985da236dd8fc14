"""Task expiry (DESIGN 9.4): a task not handed out by its `expires_at` is never run. Pop (plain
and filtered) and dispatch skip it, the reaper ends it EXPIRED in batches with its event, an
operator can requeue it; the API, CLI, admin, dashboard and /metrics show it. The PostgreSQL
leg runs the one-statement pop and expiry; the SQLite leg their IMMEDIATE-transaction twins."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from tasks import dispatch, housekeeping, services
from tasks.exceptions import TransitionRefused
from tasks.models import (
    ALLOWED_TRANSITIONS,
    FINAL_STATUSES,
    REQUEUEABLE_STATUSES,
    Scheduler,
    Task,
    TaskStatus,
)
from tests.support.seed import seed_queued
from tests.tasks.helpers import T0, fresh, history

S = TaskStatus
pytestmark = pytest.mark.django_db
LATER = T0 + timedelta(minutes=10)


@pytest.fixture
def at_t0(time_machine: TimeMachineFixture) -> TimeMachineFixture:
    time_machine.move_to(T0, tick=False)
    return time_machine


# --- the status -----------------------------------------------------------------------------


def test_expired__is_final_requeueable_and_reached_from_queued_only() -> None:
    assert S.EXPIRED in FINAL_STATUSES and S.EXPIRED in REQUEUEABLE_STATUSES
    assert ALLOWED_TRANSITIONS[S.EXPIRED] == {S.QUEUED}
    assert [f for f, to in ALLOWED_TRANSITIONS.items() if S.EXPIRED in to] == [S.QUEUED]


# --- never handed out -----------------------------------------------------------------------


@pytest.mark.parametrize("filtered", [False, True], ids=["plain", "filtered"])
def test_task_pop__skips_a_task_past_its_expires_at(
    push: Callable[..., Task], at_t0: TimeMachineFixture, filtered: bool
) -> None:
    soon = push(data={"k": 1}, priority=-1, expires_at=T0 + timedelta(seconds=10))
    other = push(data={"k": 1}, priority=5)
    filters = {"k": 1} if filtered else None

    at_t0.move_to(T0 + timedelta(seconds=10), tick=False)  # expires_at <= now: expired
    popped = services.task_pop(scheduler_id="boefje", limit=5, filters=filters)

    assert [t.id for t in popped] == [other.id]
    assert fresh(soon).status == S.QUEUED  # not handed out; the reaper ends it


FLOW_SETTINGS = {
    "rate_limit": {"rate_limit": "100/s"},
    "concurrency": {"concurrency_key": "org", "concurrency_limit": 5},
    "fair": {"fair_key": "org"},
    "fair_and_concurrency": {"fair_key": "org", "concurrency_key": "org", "concurrency_limit": 5},
}


@pytest.mark.parametrize("settings", FLOW_SETTINGS.values(), ids=FLOW_SETTINGS.keys())
def test_task_pop__a_flow_controlled_queue_skips_a_task_past_its_expires_at(
    at_t0: TimeMachineFixture, settings: dict[str, Any]
) -> None:
    # Flow-controlled queues hand out through tasks.flow's own statements, not the plain pop.
    services.scheduler_create(id="flow", **settings)
    expired = [
        services.task_push(scheduler_id="flow", data={"org": org}, priority=-1,
                           expires_at=T0 + timedelta(seconds=10))
        for org in ("a", "b")
    ]  # fmt: skip
    live = services.task_push(scheduler_id="flow", data={"org": "a"}, priority=5)

    at_t0.move_to(T0 + timedelta(seconds=10), tick=False)
    popped = services.task_pop(scheduler_id="flow", limit=5)

    assert [t.id for t in popped] == [live.id]
    assert {fresh(t).status for t in expired} == {S.QUEUED}  # not handed out; reaped later


def test_task_pop__a_blocked_head_walk_skips_a_task_past_its_expires_at(
    at_t0: TimeMachineFixture,
) -> None:
    # One value at its limit crowds the queue's head, so the pop walks the values (flow_walk_sql).
    services.scheduler_create(id="flow", concurrency_key="org", concurrency_limit=1)
    services.task_push(scheduler_id="flow", data={"org": "big"}, priority=-5)
    assert len(services.task_pop(scheduler_id="flow")) == 1  # "big" is now at its limit
    for _ in range(60):
        services.task_push(scheduler_id="flow", data={"org": "big"}, priority=-5)
    expired = services.task_push(scheduler_id="flow", data={"org": "m"},
                                 expires_at=T0 + timedelta(seconds=10))  # fmt: skip
    live = services.task_push(scheduler_id="flow", data={"org": "z"})

    at_t0.move_to(T0 + timedelta(seconds=10), tick=False)
    popped = services.task_pop(scheduler_id="flow", limit=5)

    assert [t.id for t in popped] == [live.id]
    assert fresh(expired).status == S.QUEUED


def test_task_pop__hands_out_a_task_before_its_expires_at(
    push: Callable[..., Task], at_t0: TimeMachineFixture
) -> None:
    task = push(expires_at=T0 + timedelta(seconds=10))
    at_t0.move_to(T0 + timedelta(seconds=9), tick=False)

    [popped] = services.task_pop(scheduler_id="boefje")

    assert popped.id == task.id and popped.expires_at == T0 + timedelta(seconds=10)


def test_dispatch__skips_a_task_past_its_expires_at(
    make_scheduler: Callable[..., Scheduler], at_t0: TimeMachineFixture
) -> None:
    make_scheduler("echo", kind="celery", handler="demo.echo", dispatch_threshold=5)
    expired = services.task_push(scheduler_id="echo", expires_at=T0 + timedelta(seconds=1))
    live = services.task_push(scheduler_id="echo", expires_at=T0 + timedelta(hours=1))
    at_t0.move_to(T0 + timedelta(seconds=2), tick=False)

    assert dispatch.dispatch_scheduler("echo") == 1

    assert (fresh(expired).status, fresh(live).status) == (S.QUEUED, S.DISPATCHED)


# --- the reaper -----------------------------------------------------------------------------


def test_tasks_expire_due__ends_due_expiries_expired_in_batches_with_events(
    scheduler: Scheduler, at_t0: TimeMachineFixture
) -> None:
    seed_queued("boefje", 25, expires_at=T0 + timedelta(seconds=5))
    seed_queued("boefje", 4, expires_at=T0 + timedelta(hours=1))
    seed_queued("boefje", 3)  # never expires
    at_t0.move_to(T0 + timedelta(seconds=5), tick=False)

    assert housekeeping.tasks_expire_due(batch_size=10) == 25

    counts = {s: Task.objects.filter(status=s).count() for s in (S.QUEUED, S.EXPIRED)}
    assert counts == {S.QUEUED: 7, S.EXPIRED: 25}
    task = Task.objects.filter(status=S.EXPIRED).first()
    assert history(task)[-1] == (S.QUEUED, S.EXPIRED, "expired: not handed out before expires_at")
    assert task.modified_at == T0 + timedelta(seconds=5)
    assert housekeeping.tasks_expire_due() == 0  # nothing left: idempotent


def test_tasks_expire_due__a_handed_out_task_runs_on_past_its_expiry(
    push: Callable[..., Task], at_t0: TimeMachineFixture
) -> None:
    task = push(expires_at=T0 + timedelta(seconds=5))
    services.task_pop(scheduler_id="boefje")
    at_t0.move_to(T0 + timedelta(minutes=1), tick=False)

    assert housekeeping.tasks_expire_due() == 0

    assert fresh(task).status == S.DISPATCHED  # its holder runs it: expiry is about waiting


def test_reap_job__expires_due_tasks_too(
    push: Callable[..., Task], at_t0: TimeMachineFixture
) -> None:
    from tasks.jobs import reap_expired_leases

    task = push(expires_at=T0 + timedelta(seconds=5))
    at_t0.move_to(T0 + timedelta(seconds=6), tick=False)

    assert reap_expired_leases() == 1

    assert fresh(task).status == S.EXPIRED


def test_task_requeue__an_expired_task_is_queued_again_without_its_expiry(
    push: Callable[..., Task], at_t0: TimeMachineFixture
) -> None:
    task = push(expires_at=T0 + timedelta(seconds=5))
    at_t0.move_to(T0 + timedelta(seconds=6), tick=False)
    housekeeping.tasks_expire_due()

    requeued = services.task_requeue(task_id=task.id, actor="op")

    assert (requeued.status, requeued.expires_at) == (S.QUEUED, None)
    assert [t.id for t in services.task_pop(scheduler_id="boefje")] == [task.id]


def test_task_cancel__an_expired_task_is_final(
    push: Callable[..., Task], at_t0: TimeMachineFixture
) -> None:
    task = push(expires_at=T0 + timedelta(seconds=5))
    at_t0.move_to(T0 + timedelta(seconds=6), tick=False)
    housekeeping.tasks_expire_due()

    with pytest.raises(TransitionRefused, match="EXPIRED to CANCELLED"):
        services.task_cancel(task_id=task.id)


# --- the API --------------------------------------------------------------------------------

PUSH = "/api/schedulers/boefje/push/"


def test_push_api__takes_expires_at_and_shows_it(
    scheduler: Scheduler, operator_client: APIClient, at_t0: TimeMachineFixture
) -> None:
    response = operator_client.post(PUSH, {"expires_at": "2030-01-01T12:00:00+01:00"}, "json")

    assert response.status_code == 201, response.json()
    assert response.json()["expires_at"] == "2030-01-01T11:00:00Z"
    assert Task.objects.get().expires_at == T0.replace(hour=11, minute=0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"expires_at": "2030-01-01T12:00:00"}, "time zone"),
        ({"expires_at": "2030-01-01T10:00:00Z"}, "in the future"),  # before T0
        ({"expires_at": "tomorrow"}, "format"),
        (
            {"expires_at": "2030-01-01T11:00:00Z", "not_before": "2030-01-01T12:00:00Z"},
            "after not_before",
        ),
    ],
    ids=["naive", "past", "garbage", "before-not-before"],
)
def test_push_api__bad_expires_at_is_400_naming_it(
    scheduler: Scheduler,
    operator_client: APIClient,
    at_t0: TimeMachineFixture,
    body: dict[str, Any],
    message: str,
) -> None:
    response = operator_client.post(PUSH, body, "json")

    assert response.status_code == 400
    assert message in " ".join(response.json()["expires_at"])
    assert not Task.objects.exists()


def test_push_api__batch_items_take_expires_at_each_checked(
    scheduler: Scheduler, operator_client: APIClient, at_t0: TimeMachineFixture
) -> None:
    items = [{"expires_at": "2030-01-01T11:00:00Z"}, {"expires_at": "2030-01-01T11:00:00"}]

    response = operator_client.post(PUSH, items, "json")

    good, bad = response.json()["results"]
    assert good["status"] == 201 and good["task"]["expires_at"] == "2030-01-01T11:00:00Z"
    assert bad["status"] == 400 and "expires_at" in bad["errors"]
    assert Task.objects.get().expires_at == T0.replace(hour=11, minute=0)


def test_tasks_api__filters_expired_and_by_expiry(
    push: Callable[..., Task], operator_client: APIClient, at_t0: TimeMachineFixture
) -> None:
    gone = push(expires_at=T0 + timedelta(seconds=5))
    later = push(expires_at=T0 + timedelta(hours=5))
    push()
    at_t0.move_to(T0 + timedelta(seconds=6), tick=False)
    housekeeping.tasks_expire_due()

    expired = operator_client.get("/api/tasks/", {"status": "EXPIRED"}).json()["results"]
    soon = operator_client.get("/api/tasks/", {"expires_before": "2030-01-02T00:00:00Z"})

    assert [t["id"] for t in expired] == [str(gone.id)]
    assert {t["id"] for t in soon.json()["results"]} == {str(gone.id), str(later.id)}


# --- CLI, admin, dashboard, metrics ---------------------------------------------------------


def test_task_command__push_expires_at_and_reap(
    scheduler: Scheduler, at_t0: TimeMachineFixture
) -> None:
    call_command("task", "push", "--scheduler", "boefje", "--expires-at", "2030-01-01T10:06:00Z")
    assert Task.objects.get().expires_at == T0 + timedelta(minutes=1)
    at_t0.move_to(T0 + timedelta(minutes=2), tick=False)

    out = StringIO()
    call_command("task", "reap", stdout=out)

    assert "expired 1 queued tasks" in out.getvalue()
    assert Task.objects.get().status == S.EXPIRED


def test_task_command__naive_expires_at_is_refused(scheduler: Scheduler) -> None:
    with pytest.raises(CommandError, match=r"--expires-at: .*offset"):
        call_command("task", "push", "--scheduler", "boefje", "--expires-at", "2030-01-01T10:00")
    assert not Task.objects.exists()


@pytest.fixture
def admin_client(at_t0: TimeMachineFixture) -> Client:
    """Logged in at T0 (a session from the real clock would have expired by 2030)."""
    user = User.objects.create_superuser("root", "root@example.org", "pw-not-used")
    client = Client()
    client.force_login(user)
    return client


def _expire_one(push: Callable[..., Task], time_machine: TimeMachineFixture) -> Task:
    task = push(expires_at=T0 + timedelta(seconds=5))
    time_machine.move_to(T0 + timedelta(seconds=6), tick=False)
    housekeeping.tasks_expire_due()
    return task


def test_admin__expired_tasks_are_filtered_coloured_and_requeueable(
    push: Callable[..., Task], admin_client: Client, at_t0: TimeMachineFixture
) -> None:
    task = _expire_one(push, at_t0)

    page = admin_client.get("/admin/tasks/task/", {"status__exact": "EXPIRED"})
    change = admin_client.get(f"/admin/tasks/task/{task.id}/change/")

    assert page.status_code == 200
    assert 'style="color: #a0785a; font-weight: bold">EXPIRED</span>' in page.content.decode()
    assert "?status__exact=EXPIRED" in page.content.decode()  # the list filter offers it
    assert "Requeue" in change.content.decode()


def test_dashboard_and_metrics__count_expired_tasks(
    push: Callable[..., Task], admin_client: Client, at_t0: TimeMachineFixture
) -> None:
    _expire_one(push, at_t0)
    push(expires_at=T0 + timedelta(seconds=6))  # due to expire, not reaped: not queue depth

    queues = admin_client.get("/", {"panel": "queues"}).content.decode()
    metrics = admin_client.get("/metrics").content.decode()

    assert "<th>expired</th>" in queues and "expired<b>1</b>" in queues
    assert 'scheduler_tasks{scheduler="boefje",status="EXPIRED"} 1.0' in metrics
    assert 'scheduler_queue_depth{scheduler="boefje"}' not in metrics
