"""The pull runner's HTTP client (tasks/pull_runner.py) against a real server: which answers
it retries and how long, Retry-After, 401 final, one kept-alive connection, and retries that
stop when told; the runner's batch mode. The runner process end to end is in
tests/e2e/test_runner.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from rest_framework.test import APIClient

from tasks import services
from tasks.models import Scheduler, TaskStatus
from tasks.pull_runner import (
    ApiClient,
    ApiError,
    ApiUnreachable,
    AuthRefused,
    PullRunner,
    Work,
    retry_after_seconds,
)
from tasks.registry import get_handler
from tests.e2e.fault_proxy import DROP_ANSWER, Answer, FaultProxy
from tests.support.processes import free_port
from tests.tasks.helpers import fresh, history


@pytest.fixture
def token(runner_client: APIClient) -> str:
    """The runner's token key, made however tests/conftest.py makes tokens."""
    return str(runner_client._credentials["HTTP_AUTHORIZATION"]).split()[-1]


@pytest.fixture
def proxy(live_server: Any) -> Iterator[FaultProxy]:
    proxy = FaultProxy(live_server.url)
    yield proxy
    proxy.close()


def _first_answered(answer: Answer) -> Any:
    return lambda seen, history: None if history else answer


def test_retry_after_seconds__delta_seconds_an_http_date_or_nothing() -> None:
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)

    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Tue, 01 Dec 2026 12:00:07 GMT", now=now) == 7.0
    assert retry_after_seconds("Tue, 01 Dec 2026 11:59:00 GMT", now=now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_api_client__many_calls_share_one_kept_alive_connection(
    proxy: FaultProxy, token: str
) -> None:
    with ApiClient(proxy.url, token) as client:
        for _ in range(5):
            client.call("GET", "/api/schedulers/")

    assert [seen.status for seen in proxy.seen] == [200] * 5
    assert proxy.connections == 1


def test_api_client__429_waits_its_retry_after_then_retries(proxy: FaultProxy, token: str) -> None:
    proxy.plan = _first_answered(Answer(429, {"Retry-After": "1"}, {"detail": "slow down"}))

    with ApiClient(proxy.url, token) as client:
        started = time.monotonic()
        client.call("GET", "/api/schedulers/")
        waited = time.monotonic() - started

    assert [seen.status for seen in proxy.seen] == [None, 200]
    assert waited >= 1.0


@pytest.mark.parametrize("status", [502, 503, 504])
def test_api_client__unavailable_is_retried_with_the_same_body(
    proxy: FaultProxy, token: str, status: int
) -> None:
    proxy.plan = _first_answered(Answer(status, body={"detail": "restarting"}))

    with ApiClient(proxy.url, token) as client, pytest.raises(ApiError) as refused:
        client.call("POST", "/api/schedulers/nope/pop/", {"limit": 1})

    assert refused.value.status == 404  # the server's own answer, after the retry
    assert not refused.value.retried  # the first try got an answer: it did not land
    assert [seen.body for seen in proxy.seen] == [{"limit": 1}, {"limit": 1}]


def test_api_client__a_refused_token_is_final(proxy: FaultProxy, db: None) -> None:
    with ApiClient(proxy.url, "not-a-token") as client, pytest.raises(AuthRefused) as refused:
        client.call("GET", "/api/schedulers/")

    assert refused.value.status == 401
    assert len(proxy.seen) == 1


def test_api_client__403_is_final_too(proxy: FaultProxy, token: str) -> None:
    proxy.plan = _first_answered(Answer(403, body={"detail": "not your queue"}))

    with ApiClient(proxy.url, token) as client, pytest.raises(AuthRefused) as refused:
        client.call("POST", "/api/schedulers/other/pop/", {"limit": 1})

    assert (refused.value.status, refused.value.body) == (403, {"detail": "not your queue"})
    assert len(proxy.seen) == 1


def test_api_client__500_is_not_retried(proxy: FaultProxy, token: str) -> None:
    proxy.plan = _first_answered(Answer(500, body={"detail": "boom"}))

    with ApiClient(proxy.url, token) as client, pytest.raises(ApiError) as refused:
        client.call("GET", "/api/schedulers/")

    assert refused.value.status == 500
    assert len(proxy.seen) == 1


def test_api_client__unreachable_is_retried_until_the_budget_runs_out() -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    with ApiClient(closed, "t", max_retry_seconds=2) as client:
        started = time.monotonic()
        with pytest.raises(ApiUnreachable, match="Connection refused"):
            client.call("GET", "/api/schedulers/")
        spent = time.monotonic() - started

    assert 0.5 <= spent <= 2.5


def test_api_client__retries_stop_as_soon_as_the_caller_gives_up() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    stopping = threading.Event()
    threading.Timer(0.3, stopping.set).start()

    with ApiClient(closed, "t", max_retry_seconds=60) as client:
        started = time.monotonic()
        with pytest.raises(ApiUnreachable, match="stopped retrying"):
            client.call("GET", "/api/schedulers/", give_up=stopping.is_set)
        spent = time.monotonic() - started

    assert spent < 1.5


CONFLICT = Answer(409, body={"detail": "Cannot move it", "status": "COMPLETED"})


@pytest.mark.parametrize(
    ("first", "landed"),
    [(DROP_ANSWER, True), (Answer(503, body={"detail": "restarting"}), False)],
)
def test_api_client__a_409_after_a_lost_answer_is_the_earlier_try_landed(
    proxy: FaultProxy, token: str, first: Any, landed: bool
) -> None:
    """The first try reached the server and its answer was lost (or was a 503, which did not
    reach it); the retry is answered 409 with the status asked for."""
    proxy.plan = lambda seen, history: CONFLICT if history else first

    with ApiClient(proxy.url, token) as client, pytest.raises(ApiError) as refused:
        client.call("GET", "/api/schedulers/")

    assert refused.value.status == 409
    assert refused.value.landed("COMPLETED") is landed
    assert refused.value.landed("FAILED") is False


def test_pull_runner__batch_pops_starts_and_reports_in_one_request_each(
    proxy: FaultProxy, token: str, scheduler: Scheduler
) -> None:
    """--batch 3 over five tasks: two pops (3, then 2), each batch started and reported with
    one POST /api/tasks/report/; every task ends COMPLETED with its result, through RUNNING."""
    tasks = [services.task_push(scheduler_id=scheduler.id, data={"n": n}) for n in range(5)]
    with ApiClient(proxy.url, token) as client:
        runner = PullRunner(
            client=client,
            scheduler_id=scheduler.id,
            work=Work(handler=get_handler("demo.echo")),
            wait=0,
            batch=3,
            max_tasks=5,
        )
        assert runner.run() == 5

    calls = [(seen.method, seen.path) for seen in proxy.seen]
    pop, report = ("POST", f"/api/schedulers/{scheduler.id}/pop/"), ("POST", "/api/tasks/report/")
    assert calls == [pop, report, report, pop, report, report]
    assert [seen.body["limit"] for seen in proxy.seen if seen.path.endswith("/pop/")] == [3, 2]
    for task in tasks:
        done = fresh(task)
        assert done.status == TaskStatus.COMPLETED
        assert done.result == {"echo": task.data, "attempt": 1}
        moves = [to for _, to, _ in history(done)]
        assert moves == ["QUEUED", "DISPATCHED", "RUNNING", "COMPLETED"]


def test_pull_runner__batch_skips_a_task_whose_start_was_refused(
    proxy: FaultProxy, token: str, scheduler: Scheduler
) -> None:
    """A task cancelled between the pop and the batch start is answered 409 there: it is not
    run and not reported; the other of the batch is."""
    kept, cancelled = (services.task_push(scheduler_id=scheduler.id) for _ in range(2))
    with ApiClient(proxy.url, token) as client:
        runner = PullRunner(
            client=client,
            scheduler_id=scheduler.id,
            work=Work(handler=get_handler("demo.echo")),
            wait=0,
            batch=2,
        )
        popped = runner._pop(2)
        services.task_cancel(task_id=cancelled.id)
        runner._run_batch(popped)

    assert runner.done == 1
    assert fresh(kept).status == TaskStatus.COMPLETED
    assert fresh(cancelled).status == TaskStatus.CANCELLED
    reports = [seen.body for seen in proxy.seen if seen.path == "/api/tasks/report/"]
    assert [[r["id"] for r in body["reports"]] for body in reports] == [
        [str(t.id) for t in (kept, cancelled)],
        [str(kept.id)],
    ]
