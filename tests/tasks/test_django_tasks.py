"""The Django Tasks backend (DEP 14, DESIGN §9.5), through the backport's public API: `@task`
functions' enqueue/aenqueue/using/get_result/refresh against our queue, the worker's side run
in-process (`execution.execute`). Real workers: tests/e2e/test_bring_your_own.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.test import override_settings
from django.utils import timezone
from django_tasks import TaskResultStatus, task_backends
from django_tasks.exceptions import InvalidTaskError, TaskResultDoesNotExist, TaskResultMismatch
from django_tasks.signals import task_enqueued, task_finished, task_started
from rest_framework.test import APIClient

from demo_app import background
from tasks import dispatch, execution, services
from tasks.django_tasks import HANDLER, SchedulerBackend
from tasks.models import Scheduler, Task, TaskStatus

S = TaskStatus
BACKEND = "tasks.django_tasks.SchedulerBackend"
NO_RETRY = {"retry_policy": "none", "dead_letter": False}

pytestmark = pytest.mark.django_db(transaction=True)  # enqueue on commit: real commits


def tasks_setting(**options: Any) -> dict[str, Any]:
    options.setdefault("SCHEDULER_DEFAULTS", NO_RETRY)
    return {"default": {"BACKEND": BACKEND, "QUEUES": [], "OPTIONS": options}}


@pytest.fixture(autouse=True)
def backend_without_retries() -> Iterator[None]:
    with override_settings(TASKS=tasks_setting()):
        yield


def run_queue(queue: str = "default") -> None:
    """What a worker does with each task of the queue: claim it, call the function, report."""
    dispatch.dispatch_scheduler(queue)
    for task in Task.objects.filter(scheduler_id=queue, status=S.DISPATCHED):
        execution.execute(task.id, task.attempts, worker="test-worker")


# --- enqueue: the mapping ----------------------------------------------------------------------


def test_enqueue__lands_in_the_queue_of_its_queue_name() -> None:
    result = background.multiply.enqueue(3, y=4)

    assert result.status == TaskResultStatus.READY and result.enqueued_at is not None
    queued = Task.objects.get(id=result.id)
    assert (queued.scheduler_id, queued.priority) == ("default", 0)
    assert queued.status in {S.QUEUED, S.DISPATCHED}  # sent to the broker on commit
    assert queued.data == {
        "task": "demo_app.background.multiply",
        "backend": "default",
        "args": [3],
        "kwargs": {"y": 4},
    }
    scheduler = Scheduler.objects.get(id="default")
    assert (scheduler.kind, scheduler.handler, scheduler.retry_policy) == (
        "celery",
        HANDLER,
        "none",
    )


def test_enqueue__priority_sign_queue_name_and_run_after() -> None:
    later = timezone.now() + timedelta(hours=1)

    urgent = background.multiply.using(priority=100).enqueue(1, 1)
    lazy = background.multiply.using(priority=-20, queue_name="slow", run_after=later).enqueue(1, 2)
    reports = background.summary.enqueue()  # declared priority=10, queue_name="reports"

    assert Task.objects.get(id=urgent.id).priority == -100  # theirs higher first, ours lower
    deferred = Task.objects.get(id=lazy.id)
    assert (deferred.scheduler_id, deferred.priority, deferred.not_before) == ("slow", 20, later)
    assert (Task.objects.get(id=reports.id).scheduler_id, reports.task.priority) == ("reports", 10)
    fetched = background.multiply.get_result(lazy.id)
    assert (fetched.task.priority, fetched.task.queue_name) == (-20, "slow")
    assert fetched.task.run_after == later


def test_enqueue__queue_order_follows_their_priority() -> None:
    services.scheduler_create(
        id="default", kind="celery", handler=HANDLER, paused=True, dispatch_threshold=1
    )
    low = background.multiply.using(priority=-5).enqueue(1, 1)
    high = background.multiply.using(priority=50).enqueue(2, 2)

    services.scheduler_set_paused(scheduler_id="default", paused=False)  # dispatches one

    assert Task.objects.get(id=high.id).status == S.DISPATCHED
    assert Task.objects.get(id=low.id).status == S.QUEUED


def test_enqueue__on_commit_only_when_the_transaction_commits() -> None:
    with transaction.atomic():
        kept = background.multiply.enqueue(1, 2)
        with pytest.raises(TaskResultDoesNotExist):
            background.multiply.get_result(kept.id)  # not before the commit
    assert Task.objects.filter(id=kept.id).exists()

    with pytest.raises(RuntimeError), transaction.atomic():
        dropped = background.multiply.enqueue(1, 3)
        raise RuntimeError("roll back")
    assert not Task.objects.filter(id=dropped.id).exists()


def test_enqueue__enqueue_on_commit_off_writes_in_the_transaction() -> None:
    with override_settings(TASKS=tasks_setting(ENQUEUE_ON_COMMIT=False)):
        with transaction.atomic():
            result = background.multiply.enqueue(1, 2)
            assert Task.objects.filter(id=result.id).exists()  # at once, in the transaction
        with pytest.raises(RuntimeError), transaction.atomic():
            rolled_back = background.multiply.enqueue(1, 3)
            raise RuntimeError("roll back")
    assert not Task.objects.filter(id=rolled_back.id).exists()  # and gone with it


def test_enqueue__refused_without_a_scheduler_when_creating_is_off() -> None:
    with override_settings(TASKS=tasks_setting(CREATE_SCHEDULERS=False)):
        with pytest.raises(InvalidTaskError, match="there is no scheduler 'default'"):
            background.multiply.enqueue(1, 2)
        services.scheduler_create(id="default", kind="celery", handler=HANDLER)
        assert background.multiply.enqueue(1, 2).status == TaskResultStatus.READY


def test_enqueue__refused_on_a_scheduler_that_runs_something_else() -> None:
    services.scheduler_create(id="default", kind="pull")

    with pytest.raises(InvalidTaskError, match="runs pull runners, not Django Tasks"):
        background.multiply.enqueue(1, 2)


def test_backend__bad_configuration_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="unknown \\['RETRIES'\\]"):
        SchedulerBackend("x", {"OPTIONS": {"RETRIES": 3}})
    with pytest.raises(ImproperlyConfigured, match="\\['handler'\\] cannot be set"):
        SchedulerBackend("x", {"OPTIONS": {"SCHEDULER_DEFAULTS": {"handler": "demo.echo"}}})
    with pytest.raises(ImproperlyConfigured, match="a queue name is a scheduler id"):
        SchedulerBackend("x", {"QUEUES": ["Not A Slug"]})
    with pytest.raises(InvalidTaskError, match="a queue name is a scheduler id"):
        background.multiply.using(queue_name="Bad Name")


def test_enqueue__arguments_json_cannot_hold_are_refused() -> None:
    with pytest.raises(TypeError):
        background.multiply.enqueue({1, 2}, 3)
    assert not Task.objects.exists()


def test_aenqueue_and_aget_result() -> None:
    result = async_to_sync(background.multiply.aenqueue)(2, 5)

    fetched = async_to_sync(background.multiply.aget_result)(result.id)

    assert (fetched.id, fetched.status, fetched.args) == (result.id, TaskResultStatus.READY, [2, 5])


# --- running and reading the result ------------------------------------------------------------


def test_get_result__a_run_is_successful_with_its_return_value() -> None:
    result = background.multiply.enqueue(6, 7)

    run_queue()

    fetched = background.multiply.get_result(result.id)
    assert (fetched.status, fetched.return_value, fetched.is_finished) == (
        TaskResultStatus.SUCCESSFUL,
        42,
        True,
    )
    assert (fetched.worker_ids, fetched.attempts, fetched.errors) == (["test-worker"], 1, [])
    assert fetched.enqueued_at <= fetched.started_at <= fetched.finished_at
    assert fetched.last_attempted_at == fetched.started_at
    with pytest.raises(ValueError, match="not finished yet"):
        _ = result.return_value  # the enqueued copy is stale until refreshed
    result.refresh()
    assert (result.status, result.return_value) == (TaskResultStatus.SUCCESSFUL, 42)


def test_get_result__a_failure_names_the_exception_class() -> None:
    result = background.fail.enqueue("no good")

    run_queue()

    fetched = background.fail.get_result(result.id)
    assert fetched.status == TaskResultStatus.FAILED
    [error] = fetched.errors
    assert error.exception_class is ValueError
    assert error.traceback == "builtins.ValueError: no good"
    with pytest.raises(ValueError, match="Task failed"):
        _ = fetched.return_value
    assert Task.objects.get(id=result.id).error == "builtins.ValueError: no good"


def test_get_result__retries_keep_it_ready_and_collect_each_error() -> None:
    policy = {"retry_policy": "fixed", "retry_delay_seconds": 0, "max_attempts": 2}
    with override_settings(TASKS=tasks_setting(SCHEDULER_DEFAULTS=policy)):
        result = background.fail.enqueue("again")

        run_queue()
        retrying = background.fail.get_result(result.id)
        assert (retrying.status, len(retrying.errors)) == (TaskResultStatus.READY, 1)

        run_queue()
        failed = background.fail.get_result(result.id)

    assert (failed.status, failed.attempts) == (TaskResultStatus.FAILED, 2)
    assert [e.exception_class for e in failed.errors] == [ValueError, ValueError]
    assert Task.objects.get(id=result.id).status == S.DEAD  # our dead letter, replayable


def test_run__takes_context_gets_its_result_and_attempt() -> None:
    result = background.whoami.enqueue()

    run_queue()

    assert background.whoami.get_result(result.id).return_value == {"id": result.id, "attempt": 1}


def test_run__a_coroutine_function_runs() -> None:
    result = background.asleep.enqueue(0.01)

    run_queue()

    assert background.asleep.get_result(result.id).return_value == "awake"


def test_run__signals_are_sent() -> None:
    seen: list[tuple[str, str]] = []

    def record(signal_name: str) -> Any:
        return lambda sender, task_result, **_: seen.append((signal_name, task_result.status))

    receivers = {task_enqueued: record("enqueued"), task_started: record("started")}
    receivers[task_finished] = record("finished")
    for signal, receiver in receivers.items():
        signal.connect(receiver, weak=False)
    try:
        background.multiply.enqueue(1, 2)
        run_queue()
    finally:
        for signal, receiver in receivers.items():
            signal.disconnect(receiver)

    assert seen == [("enqueued", "READY"), ("started", "RUNNING"), ("finished", "SUCCESSFUL")]


def test_get_result__unknown_ids_and_other_tasks() -> None:
    other = services.scheduler_create(id="plain")
    plain = services.task_push(scheduler_id=other.id)
    failing = background.fail.enqueue()

    for missing in ("not-a-uuid", "6f1c2a4e-0d5b-4a51-9a8e-3c1f0e2d9b7a", str(plain.id)):
        with pytest.raises(TaskResultDoesNotExist):
            task_backends["default"].get_result(missing)
    with pytest.raises(TaskResultMismatch):
        background.multiply.get_result(failing.id)


# --- pushing to a Django Tasks queue by hand ---------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"task": "os.system", "args": ["true"]}, "not in an installed app's module"),
        ({"task": "demo_app.tasks.add"}, "is not a Django Tasks task"),
        ({"task": "demo_app.background.nope"}, "cannot be imported"),
        ({"task": "demo_app.background.multiply", "args": {}}, "args must be a list"),
        ({"task": "demo_app.background.multiply", "when": 1}, "unknown keys ['when']"),
    ],
)
def test_push__data_a_django_task_could_not_run_is_a_400(
    operator_client: APIClient, data: dict[str, Any], problem: str
) -> None:
    services.scheduler_create(id="default", kind="celery", handler=HANDLER)

    response = operator_client.post("/api/schedulers/default/push/", {"data": data}, format="json")

    assert response.status_code == 400
    assert problem in response.json()["data"][0]
