"""Running one dispatched attempt (DESIGN 4.5): `execution.execute` called in-process, the
worker's code path minus Celery. Claim by CAS on the attempt, the handler's retry policy,
locks (held → deferred, attempt not spent, doubling delay), cooperative cancel, the heartbeat;
then the hand-back service and its REST endpoint, and the reaper's policy for celery tasks."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.db import OperationalError, connections
from django.utils import timezone
from time_machine import TimeMachineFixture

from scheduler_site.celery import app
from tasks import dispatch, execution, housekeeping, locks, services, transitions
from tasks.locks import MutexLock
from tasks.models import Lock, Task, TaskStatus
from tasks.registry import HANDLERS, TaskContext, register
from tasks.retry import RetrySpec
from tests.tasks.helpers import (
    T0,
    celery_queue,
    dispatched_task,
    fresh,
    history,
    running_task,
    snapshot,
)

S = TaskStatus

pytestmark = pytest.mark.usefixtures("restore_handlers")


def _run(task: Task) -> str:
    return execution.execute(task.id, task.attempts, worker="test")


# --- outcomes --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_execute__success_completes_with_the_result() -> None:
    celery_queue("echo", "demo.echo")
    task = dispatched_task("echo", n=7)

    assert _run(task) == "completed"

    task = fresh(task)
    assert (task.status, task.attempts, task.error) == (S.COMPLETED, 1, "")
    assert task.result == {"echo": {"n": 7}, "attempt": 1}
    assert task.lease_expires_at is None
    assert [(frm, to) for frm, to, _ in history(task)] == [
        ("", S.QUEUED),
        (S.QUEUED, S.DISPATCHED),
        (S.DISPATCHED, S.RUNNING),
        (S.RUNNING, S.COMPLETED),
    ]
    assert set(
        task.events.filter(to_status__in=[S.RUNNING, S.COMPLETED]).values_list("actor", flat=True)
    ) == {"test"}


@pytest.mark.django_db
def test_execute__handler_error_retries_by_the_handlers_policy_then_dead(
    frozen: TimeMachineFixture,
) -> None:
    # demo.sleep: fixed 1 s, 3 attempts, dead-letters; the queue says no retry, no dead letter.
    celery_queue("sleepy", "demo.sleep")
    task = dispatched_task("sleepy", seconds=0, fail="boom")

    for attempt in (1, 2):
        assert _run(task) == "failed"
        task = fresh(task)
        assert (task.status, task.attempts) == (S.QUEUED, attempt)
        assert task.not_before == timezone.now() + timedelta(seconds=1)
        assert task.error == "RuntimeError: boom"
        assert f"attempt {attempt}/3 failed: RuntimeError: boom" in history(task)[-1][2]
        assert dispatch.dispatch_scheduler("sleepy") == 0, "dispatched before its retry time"
        frozen.shift(timedelta(seconds=1))
        assert dispatch.dispatch_scheduler("sleepy") == 1
        task = fresh(task)

    assert _run(task) == "failed"
    task = fresh(task)
    assert (task.status, task.attempts, task.error) == (S.DEAD, 3, "RuntimeError: boom")
    assert "no attempts left" in history(task)[-1][2]


@pytest.mark.django_db
def test_execute__soft_time_limit_is_a_failed_attempt() -> None:
    def overrun(ctx: TaskContext) -> None:
        raise SoftTimeLimitExceeded()

    register("test.overrun", retry=RetrySpec(policy="none", dead_letter=False))(overrun)
    celery_queue("slow", "test.overrun")
    task = dispatched_task("slow")

    assert _run(task) == "failed"

    task = fresh(task)
    assert (task.status, task.error) == (S.FAILED, "soft time limit exceeded")


@pytest.mark.django_db
def test_execute__handler_no_longer_registered_fails_the_attempt() -> None:
    register("test.gone")(lambda ctx: None)
    celery_queue("gone", "test.gone")
    task = dispatched_task("gone")
    del HANDLERS["test.gone"]

    assert _run(task) == "failed"

    task = fresh(task)
    assert task.status == S.FAILED  # the queue's policy: no handler, no handler policy
    assert "'test.gone' is not registered" in task.error


@pytest.mark.django_db
def test_execute__late_report_after_the_lease_was_taken_back_is_lost() -> None:
    def reaped_meanwhile(ctx: TaskContext) -> str:
        past = timezone.now() - timedelta(hours=1)
        Task.objects.filter(id=ctx.task_id).update(lease_expires_at=past)
        housekeeping.tasks_reap_expired()
        return "too late"

    register("test.reaped", retry=RetrySpec(policy="fixed", delay_seconds=0, jitter=False))(
        reaped_meanwhile
    )
    celery_queue("reaped", "test.reaped")
    task = dispatched_task("reaped")

    assert _run(task) == "lost"

    task = fresh(task)
    assert (task.status, task.result, task.error) == (S.QUEUED, None, "lease expired (lost)")


# --- the claim -------------------------------------------------------------------------------


def _stale_attempt(task: Task) -> tuple[Any, int]:
    return task.id, task.attempts + 1


def _running(task: Task) -> tuple[Any, int]:
    services.task_start(task_id=task.id, actor="other-worker", attempt=task.attempts)
    return task.id, task.attempts


def _completed(task: Task) -> tuple[Any, int]:
    services.task_complete(task_id=task.id, result="done", attempt=task.attempts)
    return task.id, task.attempts


def _cancelled(task: Task) -> tuple[Any, int]:
    services.task_cancel(task_id=task.id)
    return task.id, task.attempts


def _missing(task: Task) -> tuple[Any, int]:
    return uuid.uuid4(), 1


@pytest.mark.parametrize(
    "arrange",
    [_stale_attempt, _running, _completed, _cancelled, _missing],
    ids=lambda f: f.__name__,
)
@pytest.mark.django_db
def test_execute__not_claimable_is_skipped_and_changes_nothing(
    arrange: Callable[[Task], tuple[Any, int]],
) -> None:
    celery_queue("echo", "demo.echo")
    task_id, attempt = arrange(dispatched_task("echo", n=1))
    before = snapshot()

    assert execution.execute(task_id, attempt, worker="test") == "skipped"

    assert snapshot() == before


@pytest.mark.django_db
def test_execute__a_redelivered_message_runs_the_attempt_once() -> None:
    celery_queue("echo", "demo.echo")
    task = dispatched_task("echo", n=1)

    assert [_run(task) for _ in range(3)] == ["completed", "skipped", "skipped"]

    assert fresh(task).events.filter(to_status=S.RUNNING).count() == 1


# --- locks -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_execute__lock_held_defers_without_spending_the_attempt(
    frozen: TimeMachineFixture,
) -> None:
    celery_queue("locked", "demo.locked")
    locks.acquire([MutexLock("demo", "ce-1")], owner="someone-else", ttl=timedelta(hours=1))
    task = dispatched_task("locked", key="ce-1", seconds=0)

    assert _run(task) == "deferred"

    task = fresh(task)
    assert (task.status, task.attempts, task.lock_waits) == (S.QUEUED, 0, 1)
    assert task.not_before == T0 + timedelta(seconds=0.5)
    assert (task.worker, task.lease_expires_at) == ("", None)
    # Claimed first (so a redelivered message cannot take the locks too), then handed back.
    assert history(task)[-2:] == [
        (S.DISPATCHED, S.RUNNING, "started"),
        (S.RUNNING, S.QUEUED, "handed back, attempt not spent: lock held: demo:ce-1"),
    ]
    assert locks.holder(MutexLock("demo", "ce-1")).owner == "someone-else"


@pytest.mark.django_db
def test_execute__each_lock_wait_doubles_the_delay_up_to_the_cap(
    frozen: TimeMachineFixture, settings: Any
) -> None:
    settings.LOCK_WAIT_MAX_SECONDS = 2
    celery_queue("locked", "demo.locked")
    locks.acquire([MutexLock("demo", "ce-1")], owner="someone-else", ttl=timedelta(hours=1))
    task = dispatched_task("locked", key="ce-1", seconds=0)
    delays = []

    for _ in range(4):
        assert _run(task) == "deferred"
        task = fresh(task)
        delays.append((task.not_before - timezone.now()).total_seconds())
        frozen.move_to(task.not_before, tick=False)
        assert dispatch.dispatch_scheduler("locked") == 1
        task = fresh(task)

    assert delays == [0.5, 1.0, 2.0, 2.0]
    assert task.lock_waits == 4 and task.attempts == 1  # dispatched again, nothing spent

    locks.release([MutexLock("demo", "ce-1").name], owner="someone-else")
    assert _run(task) == "completed"
    assert fresh(task).attempts == 1


@pytest.mark.django_db
def test_execute__holds_the_handlers_locks_while_running_and_releases_them() -> None:
    seen: dict[str, Any] = {}

    def peek(ctx: TaskContext) -> None:
        seen["held"] = dict(Lock.objects.values_list("name", "owner"))
        if ctx.data.get("fail"):
            raise RuntimeError("after taking the locks")

    register(
        "test.peek",
        retry=RetrySpec(policy="none", dead_letter=False),
        locks=lambda data: [MutexLock("ce", data["ce"]), MutexLock("vo", "lhcb")],
    )(peek)
    celery_queue("peek", "test.peek")

    for fail in (False, True):
        task = dispatched_task("peek", ce=f"ce-{fail}", fail=fail)
        assert _run(task) == ("failed" if fail else "completed")
        assert seen["held"] == {f"ce:ce-{fail}": str(task.id), "vo:lhcb": str(task.id)}
        assert not Lock.objects.exists(), "locks left behind after the run"


def _terminate_this_connections_backend() -> None:
    """What a database restart does to a worker's idle connection."""
    connections["default"].ensure_connection()
    pid = connections["default"].connection.info.backend_pid
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        other.close()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)  # the worker's own connection is killed and replaced
def test_execute__reconnects_when_the_database_dropped_the_connection_between_tasks() -> None:
    celery_queue("echo", "demo.echo")
    pushed = services.task_push(scheduler_id="echo", data={"n": 1})  # fast path: DISPATCHED
    with contextlib.suppress(Exception):
        app.control.purge()
    task = fresh(pushed)
    assert task.status == S.DISPATCHED
    _terminate_this_connections_backend()

    assert _run(task) == "completed"

    task = fresh(task)
    assert (task.status, task.attempts) == (S.COMPLETED, 1)
    assert [step[:2] for step in history(task)][-2:] == [
        (S.DISPATCHED, S.RUNNING),
        (S.RUNNING, S.COMPLETED),
    ]


@pytest.mark.django_db(transaction=True)
def test_reconnecting__a_statement_error_on_a_live_connection_is_raised_not_retried() -> None:
    # Found in review: a deadlock or a timeout is not a lost connection; retrying it would
    # hide the error (and a report that committed would be called lost).
    calls: list[int] = []

    def deadlocked() -> None:
        connections["default"].ensure_connection()
        calls.append(1)
        raise OperationalError("deadlock detected")

    with pytest.raises(OperationalError):
        execution._reconnecting(deadlocked)

    assert calls == [1]


# --- cancel and the heartbeat ----------------------------------------------------------------


def _wait_until(condition: Callable[[], bool], *, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.django_db(transaction=True)
def test_execute__cancel_requested_while_running_ends_cancelled() -> None:
    celery_queue("slow", "demo.sleep")
    # Committed for real here: the push's fast path dispatches it (its message, which no worker
    # reads, is purged at the end).
    task = fresh(services.task_push(scheduler_id="slow", data={"seconds": 60}))
    assert (task.status, task.attempts) == (S.DISPATCHED, 1)
    outcome: dict[str, str] = {}

    def work() -> None:
        try:
            outcome["value"] = _run(task)
        finally:
            connections.close_all()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        _wait_until(lambda: fresh(task).status == S.RUNNING)
        services.task_cancel(task_id=task.id, actor="operator")
    finally:
        worker.join(timeout=20)
        with contextlib.suppress(Exception):
            app.control.purge()
    assert not worker.is_alive(), "the handler did not stop after the cancel"

    assert outcome == {"value": "failed"}
    task = fresh(task)
    assert task.status == S.CANCELLED
    assert task.error.startswith("cancelled: ")
    assert "cancel was requested" in history(task)[-1][2]


@pytest.mark.django_db
def test_heartbeat__extends_the_lease_and_the_locks(
    frozen: TimeMachineFixture, settings: Any
) -> None:
    settings.WORKER_HEARTBEAT_SECONDS = 5
    celery_queue("echo", "demo.echo")
    task = running_task("echo")
    names = locks.acquire([MutexLock("x")], owner=str(task.id), ttl=timedelta(seconds=15))
    frozen.shift(timedelta(seconds=10))

    beat = execution.Heartbeat(task, names)
    beat.beat()

    assert fresh(task).lease_expires_at == T0 + timedelta(seconds=10 + 15)
    assert Lock.objects.get(name="x").expires_at == T0 + timedelta(seconds=10 + 15)
    assert not beat.cancelled.is_set()


@pytest.mark.django_db
def test_heartbeat__refused_after_a_cancel_request_flags_the_task() -> None:
    celery_queue("echo", "demo.echo")
    task = running_task("echo")
    services.task_cancel(task_id=task.id)

    beat = execution.Heartbeat(task, [])
    beat.beat()

    assert beat.cancelled.is_set()
    assert fresh(task).status == S.RUNNING  # cancelled when the handler reports


@pytest.mark.django_db(transaction=True)  # the beater thread reads with its own connection
def test_beater__beats_a_registered_task_when_due_and_never_after_stop(settings: Any) -> None:
    settings.WORKER_HEARTBEAT_SECONDS = 1
    celery_queue("echo", "demo.echo")
    pushed = services.task_push(scheduler_id="echo")  # committed: the fast path dispatches it
    with contextlib.suppress(Exception):
        app.control.purge()
    assert fresh(pushed).status == S.DISPATCHED
    task = services.task_start(task_id=pushed.id, actor="test", attempt=1, mint_token=True)
    claimed_lease = fresh(task).lease_expires_at
    heartbeat = execution.Heartbeat(task, [])

    heartbeat.start()
    try:
        deadline = time.monotonic() + 15
        while fresh(task).lease_expires_at == claimed_lease and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        heartbeat.stop()

    beaten_lease = fresh(task).lease_expires_at
    assert beaten_lease != claimed_lease, "the process beater never beat the task"
    assert beaten_lease is not None and beaten_lease <= timezone.now() + timedelta(seconds=3)
    time.sleep(2.5)  # two more intervals: a registered task would have been beaten again
    assert fresh(task).lease_expires_at == beaten_lease


def test_beater__a_forked_worker_process_starts_its_own() -> None:
    parent = execution._beater()
    fork = multiprocessing.get_context("fork")
    answers = fork.Queue()

    def child() -> None:
        own = execution._beater()
        answers.put((own is not parent, own.is_alive(), execution._beater() is own))

    process = fork.Process(target=child)
    process.start()
    process.join(30)

    assert answers.get(timeout=5) == (True, True, True)
    assert parent.is_alive() and execution._beater() is parent


def test_beater__survives_a_failing_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # A dead beater would let the lease of every task of the process run out mid-run.
    beater = execution.Beater()
    rounds: list[int] = []

    def failing_then_fine() -> None:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("database gone")
        time.sleep(0.05)

    monkeypatch.setattr(beater, "_round", failing_then_fine)
    beater.start()
    deadline = time.monotonic() + 10
    while len(rounds) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)

    assert len(rounds) >= 2 and beater.is_alive()


def test_beater__a_dead_one_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = execution.Beater()  # never started: not alive
    monkeypatch.setattr(execution, "_BEATER", dead)
    monkeypatch.setattr(execution, "_BEATER_PID", os.getpid())

    replacement = execution._beater()

    assert replacement is not dead and replacement.is_alive()


@pytest.mark.django_db(transaction=True)  # autocommit: on-commit hooks run inside the report
def test_execute__a_failing_completion_hook_does_not_undo_or_repeat_the_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_hook(task: Task) -> None:
        raise RuntimeError("hook failed")

    monkeypatch.setattr(transitions, "on_completed_hooks", [broken_hook])
    celery_queue("echo", "demo.echo")
    pushed = services.task_push(scheduler_id="echo")  # committed: the fast path dispatches it
    with contextlib.suppress(Exception):
        app.control.purge()

    assert _run(fresh(pushed)) == "completed"

    task = fresh(pushed)
    assert task.status == S.COMPLETED
    assert [to for _, to, _ in history(task)].count(S.COMPLETED) == 1


# --- the reaper's policy for celery tasks ----------------------------------------------------


@pytest.mark.django_db
def test_retry_spec_for__celery_task_follows_its_handler_pull_task_its_queue() -> None:
    sleepy = celery_queue("sleepy", "demo.sleep")
    pull_queue = services.scheduler_create(id="pull", retry_policy="none", dead_letter=False)
    celery_task = services.task_push(scheduler_id=sleepy.id)
    pull_task = services.task_push(scheduler_id=pull_queue.id)

    assert services.retry_spec_for(fresh(celery_task)) == HANDLERS["demo.sleep"].retry
    assert services.retry_spec_for(fresh(pull_task)) == RetrySpec.for_scheduler(pull_queue)
    del HANDLERS["demo.sleep"]
    assert services.retry_spec_for(fresh(celery_task)) == RetrySpec.for_scheduler(sleepy)


@pytest.mark.django_db
def test_reaper__lost_celery_task_retries_by_its_handlers_policy(
    frozen: TimeMachineFixture,
) -> None:
    celery_queue("sleepy", "demo.sleep", lease_seconds=60)
    task = running_task("sleepy", seconds=30)

    for attempt in (1, 2, 3):
        frozen.shift(timedelta(seconds=61))
        assert housekeeping.tasks_reap_expired() == 1
        task = fresh(task)
        if attempt < 3:
            assert (task.status, task.attempts) == (S.QUEUED, attempt)
            assert task.not_before == timezone.now() + timedelta(seconds=1)
            frozen.shift(timedelta(seconds=1))
            assert dispatch.dispatch_scheduler("sleepy") == 1
            # A worker claims it, then dies (an unclaimed one is handed back, not spent).
            services.task_start(task_id=task.id, attempt=attempt + 1, mint_token=True)

    assert (task.status, task.attempts) == (S.DEAD, 3)  # the handler dead-letters; the queue not
    assert task.error == "lease expired (lost)"
