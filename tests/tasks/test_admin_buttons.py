"""The task page acts where the operator looks (issue 13): Requeue, Cancel and Release
buttons through the services and permissions; search over data keys; one admin section for
schedules with beat's under "System"; OpenAPI tags per resource."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from rest_framework.test import APIClient

from tasks import services
from tasks.models import Scheduler, Task, TaskStatus
from tests.tasks.helpers import fresh, history, pop_one

pytestmark = pytest.mark.django_db
S = TaskStatus


@pytest.fixture
def admin_client(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("boss", "boss@example.org", "x"))
    return client


def _buttons(client: Client, task: Task) -> str:
    return client.get(f"/admin/tasks/task/{task.id}/change/").content.decode()


def _press(client: Client, task: Task, button: str) -> str:
    response = client.post(f"/admin/tasks/task/{task.id}/do/{button}/", follow=True)
    assert response.status_code == 200
    return response.content.decode()


def test_buttons__shown_by_state(admin_client: Client, scheduler: Scheduler) -> None:
    queued = services.task_push(scheduler_id=scheduler.id)
    page = _buttons(admin_client, queued)
    assert "object-button-cancel" in page
    assert "object-button-requeue" not in page and "object-button-release" not in page
    pop_one()
    page = _buttons(admin_client, fresh(queued))
    assert "object-button-release" in page and "object-button-cancel" in page


def test_buttons__release_hands_back_without_spending_the_attempt(
    admin_client: Client, scheduler: Scheduler
) -> None:
    task = services.task_push(scheduler_id=scheduler.id)
    pop_one()
    assert "Released: QUEUED." in _press(admin_client, task, "release")
    released = fresh(task)
    assert (released.status, released.attempts, released.lease_token) == (S.QUEUED, 0, "")
    assert history(released)[-1][2].startswith("handed back, attempt not spent: released by boss")


def test_buttons__cancel_then_requeue(admin_client: Client, scheduler: Scheduler) -> None:
    task = services.task_push(scheduler_id=scheduler.id)
    assert "Cancelled." in _press(admin_client, task, "cancel")
    assert fresh(task).status == S.CANCELLED
    assert "Requeued: QUEUED." in _press(admin_client, task, "requeue")
    assert fresh(task).status == S.QUEUED


def test_buttons__a_running_task_is_asked_to_cancel(
    admin_client: Client, scheduler: Scheduler
) -> None:
    task = services.task_push(scheduler_id=scheduler.id)
    pop_one()
    services.task_start(task_id=task.id)
    assert "Cancel requested" in _press(admin_client, task, "cancel")
    assert fresh(task).cancel_requested_at is not None
    assert "object-button-cancel" not in _buttons(admin_client, fresh(task))


def test_buttons__refused_when_not_valid_now_by_get_or_without_permission(
    admin_client: Client, scheduler: Scheduler
) -> None:
    task = services.task_push(scheduler_id=scheduler.id)
    assert admin_client.post(f"/admin/tasks/task/{task.id}/do/requeue/").status_code == 403
    assert admin_client.get(f"/admin/tasks/task/{task.id}/do/cancel/").status_code == 403
    assert admin_client.post(f"/admin/tasks/task/{task.id}/do/delete/").status_code == 403
    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_task"))
    client = Client()
    client.force_login(viewer)
    assert "object-button" not in _buttons(client, task)
    assert client.post(f"/admin/tasks/task/{task.id}/do/cancel/").status_code == 403
    assert fresh(task).status == S.QUEUED


def test_search__data_keys_and_error_text_together(
    admin_client: Client, scheduler: Scheduler
) -> None:
    acme = services.task_push(
        scheduler_id=scheduler.id, data={"org": "acme", "boefje": {"id": "dns"}}
    )
    other = services.task_push(scheduler_id=scheduler.id, data={"org": "other"})
    for term, found, missing in (
        ("org=acme", acme, other),
        ("boefje.id=dns", acme, other),
        ("org:other", other, acme),
    ):
        page = admin_client.get("/admin/tasks/task/", {"q": term}).content.decode()
        assert str(found.id) in page and str(missing.id) not in page, term


def test_admin_index__one_schedules_section_and_beat_under_system(admin_client: Client) -> None:
    page = admin_client.get("/admin/").content.decode()
    assert page.count(">Schedules</a>") == 2  # the section and its one model
    assert "System: beat&#x27;s periodic jobs" in page
    assert page.index("Task queues") < page.index("System: beat")


def test_schema__operations_are_tagged_by_resource(operator_client: APIClient) -> None:
    schema = operator_client.get("/api/schema/?format=json").json()
    tags = {op["tags"][0] for path in schema["paths"].values() for op in path.values()}
    assert tags == {
        "schedulers",
        "tasks",
        "schedules",
        "vos",
        "compute-elements",
        "pilots",
        "workers",
        "health",
    }
