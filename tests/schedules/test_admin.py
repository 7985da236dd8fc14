"""The schedules admin: pages render, the add form goes through schedule_create (deadline
computed), and the pause/resume/trigger actions go through the services."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.test import Client
from time_machine import TimeMachineFixture

from schedules import services
from schedules.admin import EDITABLE
from schedules.models import Schedule, ScheduleStatus
from schedules.serializers import ScheduleSerializer
from tasks import services as task_services
from tasks.models import Scheduler, Task, TaskStatus
from tests.schedules.helpers import T0

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/schedules/schedule/"
Make = Callable[..., Schedule]


@pytest.fixture
def admin_client(db: None) -> Client:
    user = User.objects.create_superuser("root", "root@example.org", "pw-not-used")
    client = Client()
    client.force_login(user)
    return client


def _messages(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def _act(client: Client, action: str, schedules: list[Schedule]) -> Any:
    return client.post(
        CHANGELIST,
        {"action": action, "_selected_action": [str(s.id) for s in schedules]},
        follow=True,
    )


def test_admin_changelist__renders_with_filters_and_search(
    clock: TimeMachineFixture, admin_client: Client, make_schedule: Make
) -> None:
    cron = make_schedule(cron="*/15 * * * *", timezone="Europe/Amsterdam", hash="acme-dns")
    interval = make_schedule(interval_seconds=90)
    once = make_schedule(run_at=T0 + timedelta(days=1))
    services.schedule_pause(schedule_id=interval.id)

    page = admin_client.get(CHANGELIST)
    assert page.status_code == 200
    body = page.content.decode()
    assert "acme-dns" in body and "Europe/Amsterdam" in body
    assert "every 90 s" in body and "once at 2030-01-02" in body

    for query, present, absent in [
        ("?status__exact=PAUSED", interval, cron),
        ("?q=acme-dns", cron, once),
        (f"?q={once.id}", once, cron),
    ]:
        body = admin_client.get(CHANGELIST + query).content.decode()
        assert str(present) in body, query
        assert str(absent) not in body, query


def test_admin_change_page__shows_recent_tasks(
    clock: TimeMachineFixture, admin_client: Client, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=60)
    untouched = make_schedule(interval_seconds=60)
    services.orchestrate()
    task = Task.objects.get(schedule=schedule)
    Task.objects.filter(schedule=untouched).delete()

    body = admin_client.get(f"{CHANGELIST}{schedule.id}/change/").content.decode()
    assert "recent tasks" in body.lower()
    assert str(task.id)[:8] in body
    assert f"/admin/tasks/task/{task.id}/change/" in body

    empty = admin_client.get(f"{CHANGELIST}{untouched.id}/change/")
    assert empty.status_code == 200
    assert "none yet" in empty.content.decode()
    assert admin_client.get(f"{CHANGELIST}add/").status_code == 200


def _form(**fields: Any) -> dict[str, Any]:
    form = {
        "scheduler": "boefje",
        "hash": "",
        "data": '{"org": "acme"}',
        "priority": "4",
        "cron": "",
        "interval_seconds": "",
        "run_at_0": "",
        "run_at_1": "",
        "timezone": "UTC",
        "start_at_0": "",
        "start_at_1": "",
        "end_at_0": "",
        "end_at_1": "",
        "min_interval_seconds": "",
        "max_interval_seconds": "",
        "backoff_factor": "",
    }
    form.update(fields)
    return form


def test_admin_add__computes_the_deadline(
    clock: TimeMachineFixture, admin_client: Client, scheduler: Scheduler
) -> None:
    response = admin_client.post(
        f"{CHANGELIST}add/", _form(cron="0 9 * * *", timezone="Europe/Amsterdam", hash="org")
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    schedule = Schedule.objects.get()
    assert (schedule.cron, schedule.hash, schedule.data, schedule.priority) == (
        "0 9 * * *",
        "org",
        {"org": "acme"},
        4,
    )
    assert schedule.status == ScheduleStatus.ACTIVE
    assert schedule.deadline_at == T0.replace(day=2, hour=8, minute=0)  # 09:00 CET


@pytest.mark.parametrize(
    "data", ['{"x": Infinity}', '{"x": 1e400}', '{"x": NaN}', '{"x": "\\ud800"}']
)
def test_admin_add__data_the_database_cannot_hold_is_a_form_error(
    clock: TimeMachineFixture, admin_client: Client, scheduler: Scheduler, data: str
) -> None:
    """Django's JSON form field parses Infinity and NaN and keeps lone surrogates: a 500 at the
    save (SQLite's JSON check) or stored where PostgreSQL's jsonb refuses it, before."""
    refused = admin_client.post(f"{CHANGELIST}add/", _form(interval_seconds="300", data=data))
    assert refused.status_code == 200  # the form again, with the error
    assert "data" in refused.context["adminform"].form.errors
    assert not Schedule.objects.exists()


def test_admin_add__interval_is_due_now_and_refuses_bad_input(
    clock: TimeMachineFixture, admin_client: Client, scheduler: Scheduler
) -> None:
    refused = admin_client.post(f"{CHANGELIST}add/", _form(cron="61 * * * *"))
    assert refused.status_code == 200  # the form again, with the error
    assert "cron" in refused.context["adminform"].form.errors
    assert not Schedule.objects.exists()

    response = admin_client.post(f"{CHANGELIST}add/", _form(interval_seconds="300"))

    assert response.status_code == 302
    assert Schedule.objects.get().deadline_at == T0


def test_admin_change__edit_recomputes_the_deadline(
    clock: TimeMachineFixture, admin_client: Client, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *", data={"org": "acme"})
    clock.move_to(T0 + timedelta(minutes=5), tick=False)
    form = _form(cron="30 * * * *")
    del form["scheduler"]  # read-only once created

    response = admin_client.post(f"{CHANGELIST}{schedule.id}/change/", form)

    assert response.status_code == 302, response.content.decode()[:2000]
    stored = Schedule.objects.get(id=schedule.id)
    assert (stored.cron, stored.priority) == ("30 * * * *", 4)
    assert stored.deadline_at == T0.replace(minute=30)


def test_admin_actions__pause_and_resume(
    clock: TimeMachineFixture, admin_client: Client, make_schedule: Make
) -> None:
    schedules = [make_schedule(cron="0 * * * *") for _ in range(2)]

    paused = _act(admin_client, "pause_schedules", schedules)
    assert "Paused 2." in _messages(paused)
    assert set(Schedule.objects.values_list("status", flat=True)) == {ScheduleStatus.PAUSED}
    assert set(Schedule.objects.values_list("deadline_at", flat=True)) == {None}

    clock.move_to(T0.replace(hour=15, minute=30), tick=False)
    resumed = _act(admin_client, "resume_schedules", schedules)
    assert "Resumed 2." in _messages(resumed)
    assert set(Schedule.objects.values_list("status", flat=True)) == {ScheduleStatus.ACTIVE}
    assert set(Schedule.objects.values_list("deadline_at", flat=True)) == {
        T0.replace(hour=16, minute=0)
    }


def test_admin_actions__trigger_makes_one_task_each_and_reports_refusals(
    clock: TimeMachineFixture, admin_client: Client, make_schedule: Make
) -> None:
    first, second = make_schedule(cron="0 * * * *"), make_schedule(cron="0 * * * *")
    _act(admin_client, "trigger_schedules", [first])

    response = _act(admin_client, "trigger_schedules", [first, second])

    messages = _messages(response)
    assert "Triggered 1." in messages
    assert any("already has an active task" in m for m in messages), messages
    assert Task.objects.filter(schedule=first).count() == 1
    assert Task.objects.filter(schedule=second, status=TaskStatus.QUEUED).count() == 1
    # Once its task is done, the schedule can be triggered again.
    for task in task_services.task_pop(scheduler_id="boefje", limit=10):
        task_services.task_complete(task_id=task.id)
    _act(admin_client, "trigger_schedules", [first])
    assert Task.objects.filter(schedule=first).count() == 2
    assert Schedule.objects.get(id=first.id).run_count == 2


def test_admin_changelist__newest_first_to_the_second(
    clock: TimeMachineFixture, admin_client: Client, make_schedule: Make
) -> None:
    # Ids in the opposite order to creation: a list in id (UUID) order would be oldest first.
    made = {}
    for n, seconds in [(4, 0), (2, 3), (3, 3), (1, 7)]:
        clock.move_to(T0 + timedelta(seconds=seconds), tick=False)
        made[n] = make_schedule(id=uuid.UUID(int=n), interval_seconds=3600)

    response = admin_client.get(CHANGELIST)

    assert [s.id for s in response.context["cl"].result_list] == [
        made[n].id
        for n in (1, 3, 2, 4)  # equal created_at: the higher id first
    ]
    page = response.content.decode()
    assert '<td class="field-created">2030-01-01 10:05:07</td>' in page
    assert '<td class="field-deadline">2030-01-01 10:05:07</td>' in page  # due at once
    assert '<td class="field-last_run">-</td>' in page


def test_schedule_admin__edits_exactly_the_apis_writable_fields() -> None:
    # One list (schedules.models.SCHEDULE_SETTABLE) serves the serializer, the CLI and the admin.
    writable = {
        name
        for name, field in ScheduleSerializer().get_fields().items()
        if not field.read_only and name not in {"id", "scheduler"}
    }
    assert set(EDITABLE) == writable
