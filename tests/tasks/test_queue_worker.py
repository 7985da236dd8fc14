"""The worker's claim and report statements (tasks/queue/worker.py): which commits wait for
their WAL flush on PostgreSQL, and what happens to a task whose claim a database crash lost
(issue 12: a worker's claim commits asynchronously, every report synchronously)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from time_machine import TimeMachineFixture

from tasks import dispatch, execution, services
from tasks.leases import LeaseProof
from tasks.models import Task, TaskEvent, TaskStatus
from tasks.queue import rows, worker
from tasks.queue.worker import _hot_prep, start_dispatched
from tasks.registry import TaskContext, register
from tasks.retry import RetrySpec
from tests.support.plans import analyzed_before_a_burst, generic_plan
from tests.support.seed import force_status
from tests.tasks.helpers import celery_queue, dispatched_task, fresh

S = TaskStatus
ASYNC = "set_config('synchronous_commit', 'off', true)"

pytestmark = pytest.mark.usefixtures("restore_handlers")


def _dispatched(scheduler_id: str, **data: Any) -> Task:
    """A pushed task, DISPATCHED: in autocommit the push's fast path dispatches it at once."""
    task = services.task_push(scheduler_id=scheduler_id, data=data)
    dispatch.dispatch_scheduler(scheduler_id)
    task = fresh(task)
    assert task.status == S.DISPATCHED
    return task


def _statements(queries: CaptureQueriesContext, start: str) -> list[str]:
    """The statements that begin with `start`, whitespace folded: the report's text is built
    as `WITH` + its CTEs (queue/worker.py _complete_ctes), a newline between the two."""
    texts = [q["sql"] or "" for q in queries]  # a prepared statement may log None
    return [sql for sql in texts if " ".join(sql.split()).startswith(start)]


@pytest.mark.postgres
@pytest.mark.usefixtures("empty_broker")
@pytest.mark.django_db(transaction=True)  # autocommit, as on a worker
def test_start_dispatched__opted_in_a_workers_claim_commits_asynchronously_its_report_does_not(
    settings: Any,
) -> None:
    settings.WORKER_CLAIM_ASYNC_COMMIT = True
    celery_queue("echo", "demo.echo")
    task = _dispatched("echo", n=1)

    with CaptureQueriesContext(connection) as queries:
        assert execution.execute(task.id, task.attempts, worker="test") == "completed"

    (claim,) = _statements(queries, "WITH started AS")
    (report,) = _statements(queries, "WITH previous AS")
    assert ASYNC in claim
    assert "synchronous_commit" not in report
    assert fresh(task).status == S.COMPLETED


def _synchronous_commit() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


def _claim(task: Task) -> Task | None:
    return start_dispatched(
        task_id=task.id,
        attempt=task.attempts,
        lease_token=None,
        mint_token=True,
        now=timezone.now(),
        actor="test",
    )


@pytest.mark.postgres
@pytest.mark.usefixtures("empty_broker")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("autocommit", [True, False])
def test_start_dispatched__the_asynchronous_commit_ends_with_the_claims_own_transaction(
    autocommit: bool, settings: Any
) -> None:
    """The session's own setting (on, as in production) is what a later write of the same
    session gets, whether the claim ran in autocommit or in a transaction the caller opened
    by turning autocommit off (no atomic block: the statement is not its own transaction)."""
    settings.WORKER_CLAIM_ASYNC_COMMIT = True
    celery_queue("echo", "demo.echo")
    task = _dispatched("echo", n=1)
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = on")  # the --tuned test cluster has off
    connection.set_autocommit(autocommit)
    try:
        assert _claim(task) is not None
        assert _synchronous_commit() == "on"
    finally:
        if not autocommit:
            connection.commit()
            connection.set_autocommit(True)
        with connection.cursor() as cursor:
            cursor.execute("RESET synchronous_commit")
    assert fresh(task).status == S.RUNNING


@pytest.mark.postgres
@pytest.mark.usefixtures("empty_broker")
@pytest.mark.django_db(transaction=True)
def test_start_dispatched__by_default_and_a_runners_report_wait_for_the_flush(
    settings: Any,
) -> None:
    celery_queue("echo", "demo.echo")
    assert settings.WORKER_CLAIM_ASYNC_COMMIT is False  # the default: durable claims
    task = _dispatched("echo", n=1)
    with CaptureQueriesContext(connection) as queries:
        assert execution.execute(task.id, task.attempts, worker="test") == "completed"
    settings.WORKER_CLAIM_ASYNC_COMMIT = True
    popped = _dispatched("echo", n=2)  # a runner's RUNNING report keeps its pop's token
    Task.objects.filter(id=popped.id).update(lease_token="t" * 64)
    with CaptureQueriesContext(connection) as reported:
        services.task_start(task_id=popped.id, actor="runner", proof=LeaseProof.holder("t" * 64))

    (claim,) = _statements(queries, "WITH started AS")
    (report,) = _statements(reported, "WITH started AS")
    assert "synchronous_commit" not in claim
    assert "synchronous_commit" not in report
    assert fresh(popped).status == S.RUNNING


@pytest.mark.django_db
def test_execute__a_claim_lost_in_a_database_crash_is_refused_then_sent_again(
    frozen: TimeMachineFixture,
) -> None:
    # The crash is played by putting back the row and events as they were before the claim
    # (what a lost asynchronous commit leaves): the worker's report carries the lost claim's
    # token and is refused; the claim timeout hands the task back and it runs again.
    def crash_after_the_claim(ctx: TaskContext) -> str:
        runs.append(ctx.attempt)
        if len(runs) > 1:
            return "ok"
        force_status([ctx.task_id], S.DISPATCHED, **before)
        TaskEvent.objects.filter(task_id=ctx.task_id, to_status=S.RUNNING).delete()
        return "side effect done"

    register("test.crash", retry=RetrySpec(policy="none", dead_letter=False))(crash_after_the_claim)
    celery_queue("crash", "test.crash")
    task = dispatched_task("crash")
    before = Task.objects.values("lease_token", "lease_expires_at", "worker").get(id=task.id)
    runs: list[int] = []

    assert execution.execute(task.id, task.attempts, worker="test") == "lost"
    assert (fresh(task).status, fresh(task).result) == (S.DISPATCHED, None)

    frozen.move_to(timezone.now() + timedelta(minutes=1))  # past the claim timeout
    assert dispatch.hand_back_unclaimed() == 1
    assert dispatch.dispatch_scheduler("crash") == 1
    again = fresh(task)
    assert execution.execute(again.id, again.attempts, worker="test") == "completed"
    assert (fresh(task).status, fresh(task).result) == (S.COMPLETED, "ok")
    assert runs == [1, 1]  # handing back spent no attempt: the lost claim was not the task's


@pytest.mark.django_db
def test_hot_prep__prepares_the_claims_parameters_as_the_rows_prep_does() -> None:
    # The claim and report prepare their parameters with the field and connection object
    # looked up once: the values bound must be the ones the shared preparation gives.
    now = timezone.now()
    task_id = "0b9b5f7e-3f4a-4a39-9d53-2b1f1c3c8e11"
    db = connections["default"]
    for field, value in (("id", task_id), ("modified_at", now), ("id", Task().id)):
        assert _hot_prep(field, value, db) == rows._prep(field, value)
    # The report's result: a JSON adapter on PostgreSQL, text on SQLite; compare what is bound.
    for result in ({"n": 1, "s": "é"}, [1, None], None, "text"):
        ours, shared = _hot_prep("result", result, db), rows._prep("result", result)
        assert type(ours) is type(shared)
        assert getattr(ours, "obj", ours) == getattr(shared, "obj", shared)
    assert str(_hot_prep("id", task_id, db)).replace("-", "") == task_id.replace("-", "")
    with pytest.warns(RuntimeWarning, match="naive datetime"):
        _hot_prep("modified_at", now.replace(tzinfo=None), db)  # as Django warns


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.parametrize("statement", ["complete", "start"])
def test_fenced_writes__reach_their_task_by_primary_key_not_by_scanning_the_leased_ones(
    statement: str,
) -> None:
    # Statistics taken while nothing was leased say task_lease_idx (partial: the leased rows)
    # is nearly empty. With `status IN (DISPATCHED, RUNNING)` alone as its predicate, which a
    # write's `id = … AND status = 'DISPATCHED'` implies, the planner read the whole index and
    # filtered on the id: a report or claim cost O(leased tasks), 2.8 ms of database CPU a
    # report with 20,000 leased (the HTTP report bench). See Task.Meta.
    analyzed_before_a_burst("leased", queued=0, leased=1000)
    held = Task.objects.filter(status=S.DISPATCHED).first()
    sql = {"complete": worker._complete_sql, "start": worker._start_sql}[statement]()
    arguments = {
        "id": ("uuid", f"'{held.id}'"),
        "attempt": ("integer", "NULL"),
        "token": ("text", f"'{held.lease_token}'"),
        "now": ("timestamptz", "now()"),
        "result": ("jsonb", "'{}'"),
        "actor": ("text", "'w'"),
        "note": ("text", "'n'"),
        "mint": ("boolean", "false"),
    }
    plan = generic_plan(sql, arguments)
    assert "task_lease_idx" not in plan, plan
    assert "tasks_task_pkey" in plan, plan
