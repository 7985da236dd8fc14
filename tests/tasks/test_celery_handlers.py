"""`celery:<task name>` handlers (DESIGN §9.5): any task registered with the Celery app runs
inside the worker's path, `execution.execute` called in-process (the worker's code minus
Celery's consumer). The real-worker runs are in tests/e2e/test_bring_your_own.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import Ignore
from celery.signals import before_task_publish
from django.core.exceptions import ValidationError
from rest_framework.test import APIClient

from demo_app import tasks as demo_tasks
from scheduler_site.celery import app
from tasks import dispatch, execution, services
from tasks.exceptions import InvalidRequest
from tasks.models import Scheduler, Task, TaskStatus
from tasks.registry import HANDLERS, check_cancelled
from tests.tasks.helpers import fresh, history

S = TaskStatus
ROOT = Path(__file__).resolve().parents[2]


@app.task(name="tests.celery_handlers.ignored")
def ignored() -> None:
    raise Ignore()


@app.task(name="tests.celery_handlers.odd_result")
def odd_result(kind: str) -> Any:
    return {"set": {1, 2}, "tuple": (1, [2, 3]), "nan": math.nan, "nul": "a\x00b"}[kind]


def _celery(scheduler_id: str, task_name: str, **fields: Any) -> Scheduler:
    fields.setdefault("retry_policy", "none")
    fields.setdefault("dead_letter", False)
    return services.scheduler_create(
        id=scheduler_id, kind="celery", handler=f"celery:{task_name}", **fields
    )


def _run_pushed(scheduler_id: str, **data: Any) -> Task:
    task = services.task_push(scheduler_id=scheduler_id, data=data)
    assert dispatch.dispatch_scheduler(scheduler_id) == 1
    task = fresh(task)
    execution.execute(task.id, task.attempts, worker="test-worker")
    return fresh(task)


@pytest.fixture
def published() -> Iterator[list[str]]:
    """The names of the Celery tasks sent to the broker meanwhile (Celery's own signal)."""
    names: list[str] = []

    def record(sender: str, **_: Any) -> None:
        names.append(sender)

    before_task_publish.connect(record, weak=False)
    yield names
    before_task_publish.disconnect(record)


# --- resolving names -------------------------------------------------------------------------


def test_handlers__celery_name_resolves_to_the_registered_task() -> None:
    handler = HANDLERS["celery:demo_app.tasks.add"]

    assert handler.name == "celery:demo_app.tasks.add"
    assert handler.retry is None  # the queue's own policy
    assert "celery:demo_app.tasks.add" in HANDLERS
    assert "celery:demo_app.tasks.nope" not in HANDLERS
    assert HANDLERS.get("celery:celery.accumulate") is not None  # one of Celery's own


def test_handlers__time_limits_are_the_celery_tasks() -> None:
    handler = HANDLERS["celery:demo_app.tasks.overrun"]

    assert (handler.soft_time_limit, handler.time_limit) == (1, None)


def test_autodiscovery__an_apps_tasks_module_is_found_in_a_fresh_process() -> None:
    # Nothing imported demo_app.tasks in that process: Celery's autodiscovery of `tasks`
    # modules (scheduler_site/celery.py) must find it.
    code = (
        "import django; django.setup(); import sys; "
        "from tasks.registry import HANDLERS; "
        "assert 'demo_app.tasks' not in sys.modules; "
        "print(HANDLERS['celery:demo_app.tasks.add'].name)"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "scheduler_site.settings_test"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "celery:demo_app.tasks.add"


@pytest.mark.django_db
def test_scheduler_create__unknown_celery_task_is_refused_on_handler() -> None:
    with pytest.raises(ValidationError) as raised:
        _celery("nope", "demo_app.tasks.nope")

    [message] = raised.value.message_dict["handler"]
    assert "no task 'demo_app.tasks.nope' is registered with the Celery app" in message
    assert not Scheduler.objects.filter(id="nope").exists()


@pytest.mark.django_db
def test_scheduler_create__the_schedulers_own_jobs_are_refused() -> None:
    with pytest.raises(ValidationError) as raised:
        _celery("inception", "tasks.run_task")

    assert "one of the scheduler's own jobs" in raised.value.message_dict["handler"][0]


def test_api__unknown_celery_task_is_a_400_naming_handler(operator_client: APIClient) -> None:
    body = {"id": "nope", "kind": "celery", "handler": "celery:no.such.task"}

    response = operator_client.post("/api/schedulers/", body, format="json")

    assert response.status_code == 400
    assert "no task 'no.such.task' is registered" in response.json()["handler"][0]


# --- data checked at push --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"args": [1]}, "missing 1 required positional argument: 'y'"),
        ({"args": [1, 2, 3]}, "takes 2 positional arguments but 3 were given"),
        ({"kwargs": {"x": 1, "z": 2}}, "unexpected keyword argument 'z'"),
        ({"args": {"x": 1}}, "args must be a list"),
        ({"args": [1], "kwargs": [2]}, "kwargs must be an object"),
        ({"x": 1, "y": 2}, "unknown keys ['x', 'y']"),
    ],
)
def test_push__data_that_does_not_fit_the_task_is_a_400_on_data(
    operator_client: APIClient, data: dict[str, Any], problem: str
) -> None:
    _celery("adder", "demo_app.tasks.add")

    response = operator_client.post("/api/schedulers/adder/push/", {"data": data}, format="json")

    assert response.status_code == 400, response.json()
    assert problem in response.json()["data"][0]
    assert not Task.objects.filter(scheduler_id="adder").exists()


def test_push__fitting_data_is_queued(operator_client: APIClient) -> None:
    _celery("adder", "demo_app.tasks.add")
    data = {"args": [1], "kwargs": {"y": 2}}

    response = operator_client.post("/api/schedulers/adder/push/", {"data": data}, format="json")

    assert response.status_code == 201
    assert response.json()["data"] == data


# --- running ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_execute__celery_task_runs_and_its_return_value_is_the_result() -> None:
    _celery("adder", "demo_app.tasks.add")

    task = _run_pushed("adder", args=[2], kwargs={"y": 3})

    assert (task.status, task.result, task.attempts) == (S.COMPLETED, 5, 1)


@pytest.mark.django_db
def test_execute__bound_task_sees_our_task_as_its_request() -> None:
    _celery("flaky", "demo_app.tasks.flaky")

    task = _run_pushed("flaky", kwargs={"fail_rate": 0, "seconds": 0})

    assert task.status == S.COMPLETED
    assert task.result == {"ok": True, "tries": 1, "id": str(task.id)}


@pytest.mark.django_db
def test_execute__self_retry_is_our_retry_and_sends_nothing(published: list[str]) -> None:
    _celery("flaky", "demo_app.tasks.flaky", retry_policy="fixed", retry_delay_seconds=0)

    task = _run_pushed("flaky", kwargs={"fail_rate": 1, "seconds": 0})

    assert (task.status, task.attempts) == (S.QUEUED, 1)  # the queue's policy: 3 attempts
    assert task.error == ("Retry requested by the task: RuntimeError('demo failure on try 1')")
    assert "attempt 1/3 failed: Retry requested by the task" in history(task)[-1][2]
    # Celery's own retry sends demo_app.tasks.flaky again at once (not on commit): not here.
    assert "demo_app.tasks.flaky" not in published


@pytest.mark.django_db
def test_execute__retries_by_the_queues_policy_then_dead_letters() -> None:
    _celery(
        "flaky", "demo_app.tasks.flaky", retry_policy="fixed", retry_delay_seconds=0,
        max_attempts=2, dead_letter=True,
    )  # fmt: skip
    task = _run_pushed("flaky", kwargs={"fail_rate": 1, "seconds": 0})
    assert dispatch.dispatch_scheduler("flaky") == 1

    execution.execute(task.id, 2, worker="test-worker")

    task = fresh(task)
    assert (task.status, task.attempts) == (S.DEAD, 2)
    assert "try 2" in task.error  # self.request.retries counted our first attempt


@pytest.mark.django_db
def test_execute__exception_fails_the_attempt_without_retry_when_the_queue_has_none() -> None:
    _celery("slow", "demo_app.tasks.slow")

    task = _run_pushed("slow", kwargs={"seconds": 0, "fail": "boom"})

    assert (task.status, task.error) == (S.FAILED, "RuntimeError: boom")


@pytest.mark.django_db
def test_execute__ignore_completes_with_no_result() -> None:
    _celery("ignored", "tests.celery_handlers.ignored")

    task = _run_pushed("ignored")

    assert (task.status, task.result) == (S.COMPLETED, None)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kind", "stored"),
    [("set", "{1, 2}"), ("tuple", [1, [2, 3]]), ("nan", "nan"), ("nul", "'a\\x00b'")],
)
def test_execute__result_json_cannot_hold_is_stored_as_its_repr(kind: str, stored: Any) -> None:
    _celery("odd", "tests.celery_handlers.odd_result")

    task = _run_pushed("odd", args=[kind])

    assert (task.status, task.result) == (S.COMPLETED, stored)


@pytest.mark.django_db
def test_execute__data_that_predates_a_signature_change_fails_the_attempt() -> None:
    _celery("adder", "demo_app.tasks.add")
    task = Task.objects.create(scheduler_id="adder", data={"args": [1]})  # not through push
    assert dispatch.dispatch_scheduler("adder") == 1

    execution.execute(task.id, 1, worker="test-worker")

    task = fresh(task)
    assert task.status == S.FAILED
    assert "missing 1 required positional argument: 'y'" in task.error


@pytest.mark.django_db
def test_dispatch__sends_the_celery_tasks_time_limits(
    django_capture_on_commit_callbacks: Any,
) -> None:
    sent: list[Any] = []

    def record(sender: str, headers: dict[str, Any], **_: Any) -> None:
        sent.append(headers.get("timelimit"))

    _celery("overrun", "demo_app.tasks.overrun")
    before_task_publish.connect(record, weak=False)
    try:
        with django_capture_on_commit_callbacks(execute=True):  # the push's fast-path dispatch
            services.task_push(scheduler_id="overrun", data={"args": [0]})
    finally:
        before_task_publish.disconnect(record)

    assert [list(limits) for limits in sent] == [[None, 1]]  # (hard, soft), the pool enforces


def test_check_cancelled__does_nothing_outside_a_workers_task() -> None:
    check_cancelled()
    assert demo_tasks.slow(0.01) == {"slept": 0.01}  # a direct call, as Celery allows


def test_call_arguments__refuses_data_that_is_not_the_shape() -> None:
    with pytest.raises(InvalidRequest) as raised:
        HANDLERS["celery:demo_app.tasks.add"].validate({"args": "12"})

    assert raised.value.payload() == {
        "data": ['args must be a list: a Celery task\'s data is {"args": [...], "kwargs": {...}}.']
    }


def test_schedule_api__data_that_does_not_fit_the_task_is_a_400_on_data(
    operator_client: APIClient,
) -> None:
    _celery("adder", "demo_app.tasks.add")
    body = {"scheduler": "adder", "interval_seconds": 60, "data": {"args": ["1"]}}

    response = operator_client.post("/api/schedules/", body, format="json")

    assert response.status_code == 400
    assert "missing 1 required positional argument: 'y'" in response.json()["data"][0]

    body["data"] = {"args": [1, 2]}
    created = operator_client.post("/api/schedules/", body, format="json")
    assert created.status_code == 201, created.json()
    edit = {"data": {"kwargs": {"x": 1}}}
    response = operator_client.patch(f"/api/schedules/{created.json()['id']}/", edit, format="json")
    assert response.status_code == 400
    assert "missing 1 required positional argument: 'y'" in response.json()["data"][0]


def test_batch_push__an_item_that_does_not_fit_the_task_is_its_own_400(
    operator_client: APIClient,
) -> None:
    _celery("adder", "demo_app.tasks.add")
    items = [
        {"data": {"args": [1, 2]}},
        {"data": {"args": [1]}},
        {"data": {"kwargs": {"x": 1, "y": 1}}},
    ]

    response = operator_client.post("/api/schedulers/adder/push/", items, format="json")

    assert response.status_code == 200
    statuses = [result["status"] for result in response.json()["results"]]
    assert statuses == [201, 400, 201]
    errors = response.json()["results"][1]["errors"]
    assert "missing 1 required positional argument: 'y'" in errors["data"][0]
    assert Task.objects.filter(scheduler_id="adder").count() == 2
