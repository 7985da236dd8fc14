"""The hot paths' shortcuts answer exactly what DRF's generic machinery did: tasks rendered by
hand (serializers.render_tasks) against TaskSerializer, and request bodies validated through
one serializer instance per process (api_input.body_errors) against a fresh serializer's
is_valid()."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import JSONRenderer

from scheduler_site.api_input import body_errors
from schedules import services as schedule_services
from tasks import serializers as serializers_module
from tasks import services
from tasks.models import Task
from tasks.serializers import (
    BatchReportSerializer,
    PoppedTaskSerializer,
    PopSerializer,
    TaskPushSerializer,
    TaskReportSerializer,
    TaskSerializer,
    push_body,
    render_tasks,
    report_body,
)
from tests.tasks.helpers import Push, finish, fresh, make_running, pop_one


def _wire(value: Any) -> str:
    """What the client receives: the JSON renderer's bytes (order kept)."""
    return JSONRenderer().render(value).decode()


def _tasks(push: Push) -> list[Task]:
    """Tasks in every shape the fields can take: nulls and values, each state's timestamps."""
    later = timezone.now() + timedelta(hours=1)
    schedule = schedule_services.schedule_create(scheduler_id="boefje", interval_seconds=60)
    failed = finish(push, "FAILED", data={"id": "f"})  # pops the oldest: first
    running = make_running(push, data={"id": "r"})
    services.task_cancel(task_id=running.id)
    queued = push(data={"n": [1, {"x": None}]}, priority=5, hash="h1", expires_at=later)
    mine = push(data={"id": "s"}, extra={"schedule_id": schedule.id})
    popped = pop_one("boefje", filters={"id": "s"})
    assert popped.id == mine.id
    return [fresh(queued), fresh(running), fresh(failed), fresh(mine)]


@pytest.mark.django_db
@pytest.mark.parametrize("zone", ["UTC", "Europe/Amsterdam"])
def test_render_tasks__equals_the_task_serializer_field_for_field(
    push: Push, zone: str, settings: Any
) -> None:
    tasks = _tasks(push)
    with timezone.override(zone):
        for task in tasks:
            for show in (False, True):
                drf = TaskSerializer(task, context={"show_lease_token": show}).data
                assert _wire(render_tasks([task], show_lease_token=show)[0]) == _wire(drf)
            popped = PoppedTaskSerializer(task).data
            assert _wire(render_tasks([task], popped=True)[0]) == _wire(popped)
    assert "lease_token" not in render_tasks(tasks)[0]


def _drf(cls: type[serializers.Serializer], data: Any) -> tuple[Any, Any]:
    body = cls(data=data)
    return (body.validated_data, None) if body.is_valid() else (None, body.errors)


BODIES: list[tuple[type[serializers.Serializer], Any]] = [
    (PopSerializer, {}),
    (PopSerializer, {"limit": 5, "filters": {"org": ["a", "b"]}, "wait": 1.5}),
    (PopSerializer, {"limit": "5"}),
    (PopSerializer, {"limit": 3, "wait": 0}),
    (PopSerializer, {"limit": 0, "nope": 1}),
    (PopSerializer, {"filters": {"bad key": 1}}),
    (PopSerializer, None),
    (PopSerializer, []),
    (TaskPushSerializer, {"data": {"a": 1}, "priority": 3, "hash": "x"}),
    (TaskPushSerializer, {"data": [1], "expires_at": "2020-01-01T00:00:00"}),
    (TaskPushSerializer, {"expires_at": "2000-01-01T00:00:00Z"}),
    (TaskReportSerializer, {"status": "COMPLETED", "result": {"ok": True}, "lease_token": "t"}),
    (TaskReportSerializer, {"status": "QUEUED", "error": 5}),
    (TaskReportSerializer, {}),
    (BatchReportSerializer, {"reports": []}),
    (BatchReportSerializer, {"reports": [{"id": "x", "status": "COMPLETED"}, {"status": 1}]}),
]


@pytest.mark.django_db
def test_body_errors__a_pure_serializers_valid_body_is_remembered_by_value_and_type() -> None:
    """A pop body validated once is answered from memory, as a copy of its own, and never
    for another body that Python finds equal (`1 == 1.0 == True`)."""
    for _ in range(2):  # validated, then served from memory
        served = body_errors(PopSerializer, {"limit": 1})[0]
        served["filters"]["org"] = "changed by the caller"
    assert body_errors(PopSerializer, {"limit": 1}) == (
        {"limit": 1, "wait": 0, "filters": {}},
        None,
    )
    for same_in_python in ({"limit": True}, {"limit": 1.0}):
        assert body_errors(PopSerializer, same_in_python) == _drf(PopSerializer, same_in_python)
        assert body_errors(PopSerializer, same_in_python)[1] is not None
    assert body_errors(PopSerializer, {"limit": 1, "x": 1})[1] == {"x": ["Unknown field."]}


@pytest.mark.django_db
@pytest.mark.parametrize(("cls", "data"), BODIES)
def test_body_errors__equal_a_fresh_serializers_is_valid(
    cls: type[serializers.Serializer], data: Any
) -> None:
    # Twice: the shared instance keeps nothing of one body for the next.
    for _ in range(2):
        assert json.loads(_wire(body_errors(cls, data))) == json.loads(_wire(_drf(cls, data)))


_TOKEN = "t" * 43
REPORT_BODIES: list[Any] = [
    {"status": "COMPLETED", "lease_token": _TOKEN},
    {"status": "COMPLETED", "lease_token": _TOKEN, "result": {"a": [1, 2.5, None, True, "x"]}},
    {"status": "RUNNING", "lease_token": _TOKEN, "attempt": 2},
    {"status": "FAILED", "error": "  boom \n", "traceback": "  Traceback\n ", "result": None},
    {"status": "FAILED", "error": "   ", "traceback": ""},
    {"status": "FAILED", "error": "x" * 10000, "traceback": "y" * 64000},
    {"status": "FAILED", "error": " " + "x" * 10000},
    {"status": "FAILED", "error": "x" * 10001},
    {"status": "FAILED", "traceback": "y" * 64001},
    {"status": "COMPLETED", "lease_token": "t" * 65},
    {"status": "COMPLETED", "lease_token": ""},
    {"status": "COMPLETED", "lease_token": " t "},
    {"status": "COMPLETED", "lease_token": None},
    {"status": "COMPLETED", "lease_token": 5},
    {"status": "COMPLETED", "error": "nul\x00"},
    {"status": "COMPLETED", "error": "half a pair \ud800"},
    {"status": "COMPLETED", "lease_token": "\udfff"},
    {"status": "COMPLETED", "result": {"nul\x00": 1}},
    {"status": "COMPLETED", "result": ["deep", {"in": "nul\x00"}]},
    {"status": "COMPLETED", "result": {"a set": {1}}},
    {"status": "COMPLETED", "result": float("inf")},
    {"status": "COMPLETED", "result": [float("-inf")]},
    {"status": "COMPLETED", "result": {"x": float("nan")}},
    {"status": "COMPLETED", "result": "half a pair \ud800"},
    {"status": "COMPLETED", "result": {"\udfff": 1}},
    {"status": "COMPLETED", "attempt": 0},
    {"status": "COMPLETED", "attempt": True},
    {"status": "COMPLETED", "attempt": 1.0},
    {"status": "COMPLETED", "attempt": "1"},
    {"status": "QUEUED"},
    {"status": "completed"},
    {"status": None},
    {"status": ["COMPLETED"]},
    {"result": 1},
    {"status": "COMPLETED", "nope": 1},
    {"status": "COMPLETED", "id": "x"},
    {},
    [],
    None,
    "COMPLETED",
]


def _report_body_or_errors(data: Any) -> tuple[Any, Any]:
    try:
        return report_body(data), None
    except ValidationError as exc:
        return None, exc.detail


@pytest.mark.parametrize("data", REPORT_BODIES)
def test_report_body__equals_the_report_serializers_is_valid(data: Any) -> None:
    """The PATCH report's own check answers what TaskReportSerializer answers: the same
    validated data (status as the TaskStatus member, defaults filled, error trimmed) or the
    same errors, naming the field."""
    ours, drf = _report_body_or_errors(data), _drf(TaskReportSerializer, data)
    assert json.loads(_wire(ours)) == json.loads(_wire(drf))
    if drf[0] is not None:
        assert ours[0] == drf[0]
        assert [type(v) for v in ours[0].values()] == [type(drf[0][k]) for k in ours[0]]


def test_report_body__a_runners_usual_report_skips_the_serializer(monkeypatch: Any) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("the serializer was asked")

    monkeypatch.setattr(serializers_module, "validated_body", refuse)
    usual = {"status": "COMPLETED", "lease_token": _TOKEN, "attempt": 1, "result": {"n": 1}}
    failed = {"status": "FAILED", "lease_token": _TOKEN, "error": "boom", "traceback": "..."}
    assert report_body(usual)["status"] == "COMPLETED"
    assert report_body(failed)["traceback"] == "..."


PUSH_BODIES: list[Any] = [
    {},
    {"data": {}},
    {"data": {"n": 1, "nested": {"list": [1, "two", None, 3.5, False]}}},
    {"data": {"n": 1}, "priority": -5, "hash": "job-1"},
    {"priority": 2**31 - 1, "hash": "h" * 64},
    {"priority": 2**31},
    {"priority": -(2**31) - 1},
    {"priority": True},
    {"priority": 1.0},
    {"priority": "1"},
    {"hash": None},
    {"hash": ""},
    {"hash": " padded "},
    {"hash": "h" * 65},
    {"hash": "nul\x00"},
    {"hash": "\ud800"},
    {"hash": 5},
    {"data": None},
    {"data": [1]},
    {"data": "text"},
    {"data": {"nul": "\x00"}},
    {"data": {"nul\x00": 1}},
    {"data": {"not json": {1, 2}}},
    {"data": {"x": float("inf")}},
    {"data": {"x": [float("-inf")]}},
    {"data": {"x": "\ud800"}},
    {"data": {"\udfff": 1}},
    {"data": {}, "not_before": None},
    {"data": {}, "expires_at": "2000-01-01T00:00:00Z"},
    {"data": {}, "nope": 1},
    [],
    None,
]


@pytest.mark.parametrize("data", PUSH_BODIES)
def test_push_body__equals_the_push_serializers_is_valid(data: Any) -> None:
    """A push's own check answers what TaskPushSerializer answers: the same validated data
    (defaults filled) or the same errors, naming the field."""
    ours, drf = push_body(data), _drf(TaskPushSerializer, data)
    assert json.loads(_wire(ours)) == json.loads(_wire(drf))
    assert ours[0] == drf[0]


def test_push_body__a_plain_push_skips_the_serializer(monkeypatch: Any) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("the serializer was asked")

    monkeypatch.setattr(serializers_module, "body_errors", refuse)
    pushed = push_body({"data": {"n": 1}, "priority": 3, "hash": "h"})
    assert pushed == (
        {"data": {"n": 1}, "priority": 3, "hash": "h", "not_before": None, "expires_at": None},
        None,
    )
