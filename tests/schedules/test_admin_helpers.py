"""The schedule page acts where the operator looks (DESIGN 9.6, issue 13): Pause, Resume,
Trigger buttons and the run history; the cron helper (words and the next 5 runs in the
schedule's zone); the time zone as a searchable select; search over data keys."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from time_machine import TimeMachineFixture

from schedules.models import Schedule, ScheduleStatus
from tasks.models import Task

pytestmark = pytest.mark.django_db

Make = Callable[..., Schedule]


@pytest.fixture
def admin_client(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.org", "x"))
    return client


def _page(client: Client, schedule: Schedule) -> str:
    return client.get(f"/admin/schedules/schedule/{schedule.id}/change/").content.decode()


def _press(client: Client, schedule: Schedule, button: str) -> str:
    response = client.post(f"/admin/schedules/schedule/{schedule.id}/do/{button}/", follow=True)
    assert response.status_code == 200
    return response.content.decode()


def test_buttons__pause_resume_and_trigger_through_the_services(
    clock: TimeMachineFixture, admin_client: Client, make_schedule: Make
) -> None:
    schedule = make_schedule(interval_seconds=3600, hash="nightly")
    page = _page(admin_client, schedule)
    assert "object-button-pause" in page and "object-button-trigger" in page
    assert "object-button-resume" not in page
    assert f"/admin/tasks/task/?schedule__id__exact={schedule.id}" in page  # run history

    assert "Paused." in _press(admin_client, schedule, "pause")
    schedule.refresh_from_db()
    assert (schedule.status, schedule.deadline_at) == (ScheduleStatus.PAUSED, None)
    assert "object-button-resume" in _page(admin_client, schedule)

    assert "Resumed: next run" in _press(admin_client, schedule, "resume")
    assert "Triggered: task" in _press(admin_client, schedule, "trigger")
    [task] = Task.objects.filter(schedule=schedule)
    history = admin_client.get(f"/admin/tasks/task/?schedule__id__exact={schedule.id}")
    assert str(task.id) in history.content.decode()
    # A second trigger while its task is active: refused with the reason, nothing added.
    assert "already has an active task" in _press(admin_client, schedule, "trigger")
    assert Task.objects.filter(schedule=schedule).count() == 1


def test_buttons__refused_without_the_change_permission_or_by_get(
    admin_client: Client, make_schedule: Make
) -> None:
    schedule = make_schedule()
    url = f"/admin/schedules/schedule/{schedule.id}/do/pause/"
    assert admin_client.get(url).status_code == 403
    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_schedule"))
    client = Client()
    client.force_login(viewer)
    assert "object-button" not in _page(client, schedule)
    assert client.post(url).status_code == 403
    schedule.refresh_from_db()
    assert schedule.status == ScheduleStatus.ACTIVE


def test_cron_preview__words_and_the_next_five_runs_in_the_zone(
    time_machine: TimeMachineFixture,
) -> None:
    time_machine.move_to(datetime(2030, 3, 29, 12, 0, tzinfo=UTC), tick=False)
    admin_client = Client()  # logged in now: a session from before the jump would have expired
    admin_client.force_login(User.objects.create_superuser("root", "root@example.org", "x"))
    url = "/admin/schedules/schedule/cron-preview/"
    body = admin_client.get(url, {"cron": "30 2 * * *", "timezone": "Europe/Amsterdam"}).json()
    assert body["ok"] and body["description"] == "At 02:30 every day"
    # The night of 31 March 2030 springs forward at 02:00: that run is at 03:00 (+02:00).
    assert body["next"] == [
        "2030-03-30T02:30:00+01:00",
        "2030-03-31T03:00:00+02:00",
        "2030-04-01T02:30:00+02:00",
        "2030-04-02T02:30:00+02:00",
        "2030-04-03T02:30:00+02:00",
    ]
    bad = admin_client.get(url, {"cron": "61 * * * *", "timezone": "UTC"}).json()
    assert (bad["ok"], bad["field"]) == (False, "cron")
    zone = admin_client.get(url, {"cron": "* * * * *", "timezone": "Mars/Olympus"}).json()
    assert (zone["ok"], zone["field"]) == (False, "timezone")
    never = admin_client.get(url, {"cron": "1 1 */100 * MON#4", "timezone": "UTC"}).json()
    assert never["field"] == "cron" and not never["ok"]
    assert Client().get(url, {"cron": "* * * * *"}).status_code == 302  # admin login first


def test_form__the_time_zone_is_a_select_of_iana_zones(admin_client: Client) -> None:
    page = admin_client.get("/admin/schedules/schedule/add/").content.decode()
    assert '<select name="timezone" class="tz-select"' in page
    assert '<option value="Europe/Amsterdam">Europe/Amsterdam</option>' in page
    assert "admin/js/vendor/select2/select2.full.min.js" in page
    assert "scheduler/schedule_form.js" in page


def test_search__data_keys_strings_numbers_and_nested(
    admin_client: Client, make_schedule: Make
) -> None:
    make_schedule(hash="a", data={"org": "acme", "n": 3, "boefje": {"id": "dns"}})
    make_schedule(hash="b", data={"org": "other", "n": 4})
    for term, found in (("org=acme", "a"), ("n=3", "a"), ("boefje.id:dns", "a"), ("n=4", "b")):
        page = admin_client.get("/admin/schedules/schedule/", {"q": term}).content.decode()
        assert f"boefje/{found}<" in page, term
        other = "b" if found == "a" else "a"
        assert f"boefje/{other}<" not in page, term
