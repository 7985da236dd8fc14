"""tasks/api_lean.py: the hot endpoints' lean views answer as their DRF views do, status,
body and headers, and hand everything but the common case to them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.core.signals import request_finished
from django.db import close_old_connections
from django.test import RequestFactory
from rest_framework.test import APIClient
from rest_framework.throttling import AnonRateThrottle, SimpleRateThrottle
from rest_framework.views import APIView
from time_machine import TimeMachineFixture

from scheduler_site.throttles import UserRateThrottle
from scheduler_site.urls import _lean_routes, router
from tasks import accounts, services, workers
from tasks.api import SchedulerViewSet
from tasks.models import Worker
from tests.tasks.helpers import Push


def _views() -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
    """Route name -> (its lean view, the router's DRF view behind it)."""
    lean = {route.pattern.regex.pattern: route.callback for route in _lean_routes(router.urls)}
    return {
        route.name: (lean[route.pattern.regex.pattern], route.callback)
        for route in router.urls
        if route.pattern.regex.pattern in lean
    }


def _call(view: Callable[..., Any], method: str, key: str, body: Any, **kwargs: Any) -> Any:
    factory = RequestFactory()
    raw = body if isinstance(body, str) else json.dumps(body)
    request = getattr(factory, method.lower())(
        "/x/", raw, content_type="application/json", HTTP_AUTHORIZATION=f"Token {key}"
    )
    response = view(request, **kwargs)
    if hasattr(response, "render"):
        response.render()
    return response


def _shape(value: Any) -> Any:
    """A success answer without the values that differ from one task to the next."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


def _same(lean: Any, drf: Any) -> None:
    assert lean.status_code == drf.status_code, (lean.content, drf.content)
    for header in ("Content-Type", "Allow", "Vary", "Retry-After"):
        assert lean.get(header) == drf.get(header), header
    lean_body, drf_body = json.loads(lean.content), json.loads(drf.content)
    if lean.status_code < 300:
        assert _shape(lean_body) == _shape(drf_body)
    else:
        assert lean_body == drf_body


def _key(user: User) -> str:
    return accounts.token_create(user=user)[1]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "queue", "body"),
    [
        ("scheduler-pop", "boefje", {}),
        ("scheduler-pop", "boefje", {"limit": 2, "filters": {"n": 1}}),
        ("scheduler-pop", "boefje", {"limit": 0, "nope": 1}),
        ("scheduler-pop", "nowhere", {}),
        ("scheduler-pop", "boefje", "{not json"),
        ("scheduler-pop", "boefje", "[" * 70 + "]" * 70),
        ("scheduler-push", "boefje", {"data": {"n": 1}, "priority": 2}),
        ("scheduler-push", "boefje", [{"data": {"n": 1}}, {"data": 5}]),
        ("scheduler-push", "boefje", {"hash": "same"}),
        ("scheduler-push", "boefje", {"bogus": 1}),
        ("scheduler-push", "nowhere", {}),
        ("task-report", None, {"reports": []}),
    ],
)
def test_lean_views__answer_as_the_drf_views(
    push: Push, operator: User, name: str, queue: str | None, body: Any
) -> None:
    lean, drf = _views()[name]
    key = _key(operator)
    kwargs = {"pk": queue} if queue else {}
    for _ in range(4):  # enough for both views' pops
        push(data={"n": 1})
    push(data={"n": 2}, hash="same")
    _same(_call(lean, "POST", key, body, **kwargs), _call(drf, "POST", key, body, **kwargs))


@pytest.mark.django_db
def test_lean_views__a_report_answers_as_the_drf_view(push: Push, runner: User) -> None:
    lean, drf = _views()["task-detail"]
    key = _key(runner)
    pop = _views()["scheduler-pop"][0]
    for _ in range(2):
        push()
    tasks = json.loads(_call(pop, "POST", key, {"limit": 2}, pk="boefje").content)["results"]
    for task, view in zip(tasks, (lean, drf), strict=True):
        done = {"status": "COMPLETED", "lease_token": task["lease_token"], "result": {}}
        wrong = {**done, "lease_token": "stale"}
        responses = [_call(v, "PATCH", key, wrong, pk=task["id"]) for v in (lean, drf)]
        _same(*responses)
        assert responses[0].status_code == 409
        ok = _call(view, "PATCH", key, done, pk=task["id"])
        assert ok.status_code == 200, ok.content
    other = {"status": "COMPLETED", "lease_token": "x"}
    missing = "00000000-0000-0000-0000-000000000000"
    _same(*[_call(v, "PATCH", key, other, pk=missing) for v in (lean, drf)])


@pytest.mark.django_db
def test_lean_views__only_the_common_case_skips_drf(
    push: Push, runner: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatched: list[str] = []
    original = APIView.dispatch

    def spy(self: APIView, request: Any, *args: Any, **kwargs: Any) -> Any:
        dispatched.append(request.method)
        return original(self, request, *args, **kwargs)

    monkeypatch.setattr(APIView, "dispatch", spy)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {_key(runner)}")
    url = "/api/schedulers/boefje/pop/"
    assert client.post(url, {}, format="json").status_code == 200
    assert dispatched == []  # lean
    assert client.post(url + "?format=json", {}, format="json").status_code == 200
    assert client.post(url, {}, format="json", HTTP_ACCEPT="text/html").status_code == 200
    assert client.get(url).status_code == 405
    client.credentials(HTTP_AUTHORIZATION="Token wrong")
    assert client.post(url, {}, format="json").status_code == 401
    assert dispatched == ["POST", "POST", "GET", "POST"]


@pytest.mark.django_db
def test_lean_views__refusals_are_drfs_own(
    push: Push, runner: User, make_scheduler: Callable[..., Any]
) -> None:
    """A permission refused, a queue out of a limited runner's reach: DRF's answers."""
    make_scheduler("other")
    limited = accounts.account_set_up(username="r2", role="runner", scheduler_ids=["boefje"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {limited.token}")
    refused = client.post("/api/schedulers/other/pop/", {}, format="json")
    assert refused.status_code == 403 and "other" in refused.json()["detail"]
    assert client.post("/api/schedulers/boefje/push/", {}, format="json").status_code == 403
    assert client.post("/api/schedulers/boefje/pop/", {}, format="json").status_code == 200
    services.task_push(scheduler_id="other")


@pytest.mark.django_db
def test_lean_views__the_account_rate_holds(
    push: Push, runner: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted once per request, refused as DRF refuses (429 with Retry-After)."""
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {"anon": "100/min", "user": "4/min"})
    cache.clear()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {_key(runner)}")
    codes = [client.post("/api/schedulers/boefje/pop/", {}, format="json") for _ in range(5)]
    assert [r.status_code for r in codes] == [200, 200, 200, 200, 429]
    assert int(codes[-1]["Retry-After"]) >= 1
    cache.clear()


class _BurstThrottle(UserRateThrottle):
    scope = "burst"


@pytest.mark.django_db
def test_lean_views__a_429_counts_the_request_once_in_the_other_throttles(
    push: Push, runner: User, monkeypatch: pytest.MonkeyPatch, time_machine: TimeMachineFixture
) -> None:
    """One throttle refuses, another lets the request through: that one counts it once (the
    DRF view behind used to run the throttles a second time), and the 429 is DRF's."""
    rates = {"anon": "100/min", "user": "100/min", "burst": "1/min"}
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", rates)
    throttles = [AnonRateThrottle, _BurstThrottle, UserRateThrottle]
    monkeypatch.setattr(SchedulerViewSet, "throttle_classes", throttles)
    time_machine.move_to(datetime(2026, 12, 1, 12, 0, 10, tzinfo=UTC), tick=False)
    cache.clear()
    lean, drf = _views()["scheduler-pop"]
    key = _key(runner)
    assert _call(lean, "POST", key, {}, pk="boefje").status_code == 200
    refused = _call(lean, "POST", key, {}, pk="boefje")
    window = int(time.time() // 60)
    assert cache.get(f"throttle_user_{runner.pk}:{window}") == 2
    assert cache.get(f"throttle_burst_{runner.pk}:{window}") == 1  # the refusal is not counted
    _same(refused, _call(drf, "POST", key, {}, pk="boefje"))
    assert refused.status_code == 429 and int(refused["Retry-After"]) == 50
    cache.clear()


def _close(response: Any) -> None:
    """What the WSGI server does after writing the answer, as Django's test client does it
    (without closing the test's database connection on request_finished)."""
    request_finished.disconnect(close_old_connections)
    try:
        response.close()
    finally:
        request_finished.connect(close_old_connections)


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["lean", "drf"])
def test_pop__the_runner_is_noted_once_its_answer_is_sent(
    push: Push, runner: User, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's liveness note waits for the response's close(), which the WSGI server
    calls after writing it: the answer does not wait for the note."""
    monkeypatch.setattr(workers, "_runner_writes", {})  # no earlier test's note in memory
    lean, drf = _views()["scheduler-pop"]
    push()
    response = _call(lean if path == "lean" else drf, "POST", _key(runner), {}, pk="boefje")
    assert response.status_code == 200
    assert len(json.loads(response.content)["results"]) == 1
    assert not Worker.objects.exists()

    _close(response)

    assert Worker.objects.get().queues == ["boefje"]


@pytest.mark.django_db
def test_report__a_refused_report_still_notes_its_runner_after_the_answer(
    push: Push, runner: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "_runner_writes", {})
    lean = _views()["task-detail"][0]
    task = push()
    body = {"status": "COMPLETED", "lease_token": "not-its-token"}
    response = _call(lean, "PATCH", _key(runner), body, pk=str(task.id))
    assert response.status_code == 409
    assert not Worker.objects.exists()

    _close(response)

    assert Worker.objects.filter(name="runner").exists()
