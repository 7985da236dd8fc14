"""The pull runner's HTTP client (tasks/pull_runner.py) against a real server: which answers
it retries and how long, Retry-After, 401 final, one kept-alive connection, and retries that
stop when told. The runner process end to end is in tests/e2e/test_runner.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from rest_framework.test import APIClient

from tasks.pull_runner import ApiClient, ApiError, ApiUnreachable, AuthRefused, retry_after_seconds
from tests.e2e.fault_proxy import DROP_ANSWER, Answer, FaultProxy
from tests.support.processes import free_port


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
