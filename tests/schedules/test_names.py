"""Schedule names (DESIGN §9.5): optional, unique per scheduler, taken for the id by the API
(`/api/schedules/{id or name}/`, `?scheduler=` when a name is in several schedulers), the CLI
(`schedule pause NAME [--scheduler ID]`) and the admin's search."""

from __future__ import annotations

from collections.abc import Callable
from io import StringIO
from typing import Any
from urllib.parse import quote

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import Client
from rest_framework.test import APIClient

from schedules import services
from schedules.models import Schedule, ScheduleStatus
from schedules.selectors import find_schedule
from tasks import services as task_services
from tasks.exceptions import InvalidRequest
from tasks.models import Scheduler, Task

pytestmark = pytest.mark.django_db

Make = Callable[..., Schedule]
NAME = "nightly report.v2"  # spaces and dots, as beat's names have them


@pytest.fixture
def other(db: None) -> Scheduler:
    return task_services.scheduler_create(id="other")


def _run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


# --- the model -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a/b", "must not contain '/'"),
        ("tab\there", "control characters"),
        (" padded", "must not start or end with spaces"),
        ("6f1c2a4e-0d5b-4a51-9a8e-3c1f0e2d9b7a", "must not look like a UUID"),
        ("x" * 201, "at most 200 characters"),
    ],
)
def test_name__refused_shapes(make_schedule: Make, name: str, problem: str) -> None:
    with pytest.raises(ValidationError) as raised:
        make_schedule(name=name)

    assert problem in raised.value.message_dict["name"][0]


def test_name__unique_per_scheduler_not_across(make_schedule: Make, other: Scheduler) -> None:
    make_schedule(name=NAME)
    make_schedule(name=NAME, scheduler_id="other")  # another scheduler: fine
    make_schedule(name="")  # blank is no name, any number of them
    make_schedule(name=None)

    with pytest.raises(ValidationError) as raised:
        make_schedule(name=NAME)

    assert "has a schedule with this name" in raised.value.message_dict["name"][0]
    assert Schedule.objects.filter(name__isnull=True).count() == 2


def test_find_schedule__by_id_name_and_scheduler(make_schedule: Make, other: Scheduler) -> None:
    mine = make_schedule(name=NAME)
    theirs = make_schedule(name=NAME, scheduler_id="other")

    assert find_schedule(str(mine.id)) == mine
    assert find_schedule(NAME, scheduler_id="other") == theirs
    with pytest.raises(InvalidRequest) as raised:
        find_schedule(NAME)
    assert raised.value.payload() == {
        "scheduler": [
            f"schedules named {NAME!r} are in several schedulers (boefje, other); say which one."
        ]
    }


# --- the API ---------------------------------------------------------------------------------


def test_api__name_is_set_listed_and_filtered(operator_client: APIClient, scheduler: Any) -> None:
    body = {"scheduler": "boefje", "interval_seconds": 60, "name": NAME}

    created = operator_client.post("/api/schedules/", body, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["name"] == NAME
    duplicate = operator_client.post("/api/schedules/", body, format="json")
    assert duplicate.status_code == 400
    assert "name" in duplicate.json()

    listed = operator_client.get("/api/schedules/", {"name": NAME}).json()["results"]
    assert [s["id"] for s in listed] == [created.json()["id"]]
    assert operator_client.get("/api/schedules/", {"name": "nope"}).json()["results"] == []


def test_api__every_detail_route_takes_the_name(
    operator_client: APIClient, make_schedule: Make
) -> None:
    schedule = make_schedule(name=NAME)
    url = f"/api/schedules/{quote(NAME)}/"

    assert operator_client.get(url).json()["id"] == str(schedule.id)
    patched = operator_client.patch(url, {"priority": 5}, format="json")
    assert patched.status_code == 200 and patched.json()["priority"] == 5
    assert operator_client.post(f"{url}pause/").json()["status"] == ScheduleStatus.PAUSED
    assert operator_client.post(f"{url}resume/").json()["status"] == ScheduleStatus.ACTIVE
    triggered = operator_client.post(f"{url}trigger/")
    assert triggered.status_code == 201
    assert Task.objects.get().schedule_id == schedule.id
    assert operator_client.delete(url).status_code == 204
    assert not Schedule.objects.exists()


def test_api__a_name_in_several_schedulers_needs_scheduler(
    operator_client: APIClient, make_schedule: Make, other: Scheduler
) -> None:
    make_schedule(name=NAME)
    theirs = make_schedule(name=NAME, scheduler_id="other")
    url = f"/api/schedules/{quote(NAME)}/"

    ambiguous = operator_client.post(f"{url}pause/")
    assert ambiguous.status_code == 400
    assert "several schedulers (boefje, other)" in ambiguous.json()["scheduler"][0]

    paused = operator_client.post(f"{url}pause/?scheduler=other")
    assert paused.status_code == 200 and paused.json()["id"] == str(theirs.id)
    assert operator_client.get(f"{url}?scheduler=third").status_code == 404
    unknown = operator_client.get(f"{url}?schedular=other")  # strict query parameters
    assert unknown.status_code == 400 and "schedular" in unknown.json()


def test_api__unknown_name_or_id_is_404(operator_client: APIClient, make_schedule: Make) -> None:
    make_schedule(name=NAME)

    for ref in (
        "no-such-schedule",
        "6f1c2a4e-0d5b-4a51-9a8e-3c1f0e2d9b7a",
        "nul%00here",
        "x" * 201,
    ):
        response = operator_client.get(f"/api/schedules/{ref}/")
        assert response.status_code == 404, ref
        assert "detail" in response.json()


# --- the CLI and the admin -------------------------------------------------------------------


def test_cli__create_with_a_name_then_act_by_name(scheduler: Scheduler, other: Scheduler) -> None:
    for queue in ("boefje", "other"):
        _run(
            "schedule", "create", "--scheduler", queue, "--interval-seconds", "60", "--name", NAME
        )  # fmt: skip
    mine = Schedule.objects.get(scheduler_id="boefje")

    with pytest.raises(CommandError, match=r"several schedulers \(boefje, other\)"):
        _run("schedule", "pause", NAME)
    out = _run("schedule", "pause", NAME, "--scheduler", "boefje")

    assert out.strip().startswith(f"paused {mine.id} (boefje/{NAME}): PAUSED")
    assert Schedule.objects.get(id=mine.id).status == ScheduleStatus.PAUSED
    assert Schedule.objects.get(scheduler_id="other").status == ScheduleStatus.ACTIVE
    assert NAME in _run("schedule", "list", "--scheduler", "boefje")
    with pytest.raises(
        CommandError, match="No schedule has the id, name, hash or id prefix 'nope'"
    ):
        _run("schedule", "trigger", "nope")
    _run("schedule", "delete", str(mine.id))  # the id still works
    assert not Schedule.objects.filter(id=mine.id).exists()


def test_admin__search_finds_a_schedule_by_name(make_schedule: Make) -> None:
    named = make_schedule(name=NAME)
    make_schedule(name="something else")
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.org", "unused"))

    page = client.get("/admin/schedules/schedule/", {"q": "nightly"})

    assert page.status_code == 200
    assert list(page.context["cl"].result_list) == [named]


def test_services__a_name_taken_meanwhile_is_a_400_on_name(make_schedule: Make) -> None:
    make_schedule(name=NAME)
    second = make_schedule(name="second")

    # full_clean passes for this instance's own check; the constraint catches a race.
    second.name = NAME
    # In a savepoint of its own, as schedule_update saves.
    saving = services._integrity_as_input(second)
    with pytest.raises(ValidationError) as raised, saving, transaction.atomic():
        second.save(update_fields=["name"])

    assert "has a schedule with this name" in raised.value.message_dict["name"][0]
