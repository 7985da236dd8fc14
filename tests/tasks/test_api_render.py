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
from rest_framework.renderers import JSONRenderer

from scheduler_site.api_input import body_errors
from schedules import services as schedule_services
from tasks import services
from tasks.models import Task
from tasks.serializers import (
    BatchReportSerializer,
    PoppedTaskSerializer,
    PopSerializer,
    TaskPushSerializer,
    TaskReportSerializer,
    TaskSerializer,
    render_tasks,
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
