"""The Django admin of queues, tasks and events: pages render, actions go through the services."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.test import Client

from tasks import services
from tasks.models import Scheduler, Task, TaskStatus
from tasks.retry import RetrySpec

S = TaskStatus
Push = Callable[..., Task]


@pytest.fixture
def admin_client(db: None) -> Client:
    user = User.objects.create_superuser("root", "root@example.org", "pw-not-used")
    client = Client()
    client.force_login(user)
    return client


def _finish(push: Push, n: int, *, dead_letter: bool) -> Task:
    task = push(data={"n": n})
    services.task_pop(scheduler_id=task.scheduler_id, filters={"n": n})
    services.task_fail(task_id=task.id, retry=RetrySpec(policy="none", dead_letter=dead_letter))
    return task


def _messages(response: object) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_admin_changelists__render(admin_client: Client, push: Push) -> None:
    task = push(data={"n": 1}, hash="visible-hash")
    services.task_pop(scheduler_id="boefje")

    for url, needle in [
        ("/admin/tasks/scheduler/", "boefje"),
        ("/admin/tasks/task/", str(task.id)),
        ("/admin/tasks/task/?status__exact=DISPATCHED", str(task.id)),
        ("/admin/tasks/task/?q=visible-hash", str(task.id)),
        ("/admin/tasks/taskevent/", "popped"),
        ("/admin/tasks/taskevent/?to_status=DISPATCHED", "popped"),
    ]:
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert needle in response.content.decode(), url


@pytest.mark.django_db
def test_admin_scheduler_changelist__shows_queued_count(admin_client: Client, push: Push) -> None:
    for n in range(3):
        push(data={"n": n})
    response = admin_client.get("/admin/tasks/scheduler/")
    assert response.context["cl"].result_list[0].id == "boefje"
    assert '<td class="field-queued">3</td>' in response.content.decode()


@pytest.mark.django_db
def test_admin_task_change_page__events_inline_and_read_only(
    admin_client: Client, push: Push
) -> None:
    task = push(data={"n": 1})
    services.task_pop(scheduler_id="boefje", worker="runner-7")

    response = admin_client.get(f"/admin/tasks/task/{task.id}/change/")

    assert response.status_code == 200
    page = response.content.decode()
    assert "pushed" in page and "popped" in page and "runner-7" in page
    assert 'name="_save"' not in page, "tasks change only through the state machine"
    # A POST to the change page cannot edit the row either.
    admin_client.post(f"/admin/tasks/task/{task.id}/change/", {"status": "COMPLETED"})
    assert Task.objects.get(id=task.id).status == S.DISPATCHED
    assert admin_client.get("/admin/tasks/task/add/").status_code == 403


@pytest.mark.django_db
def test_admin_scheduler_actions__pause_and_resume(
    admin_client: Client, make_scheduler: Callable[..., Scheduler], push: Push
) -> None:
    make_scheduler("other")
    push()

    response = admin_client.post(
        "/admin/tasks/scheduler/",
        {"action": "pause_queues", "_selected_action": ["boefje", "other"]},
        follow=True,
    )

    assert response.status_code == 200
    assert set(Scheduler.objects.filter(paused=True).values_list("id", flat=True)) == {
        "boefje",
        "other",
    }
    assert "Paused 2." in _messages(response)
    assert services.task_pop(scheduler_id="boefje") == []

    admin_client.post(
        "/admin/tasks/scheduler/", {"action": "resume_queues", "_selected_action": ["boefje"]}
    )
    assert list(Scheduler.objects.filter(paused=True).values_list("id", flat=True)) == ["other"]
    assert len(services.task_pop(scheduler_id="boefje")) == 1


@pytest.mark.django_db
def test_admin_task_actions__cancel(admin_client: Client, push: Push) -> None:
    queued = push(data={"n": 1})
    running = push(data={"n": 2})
    services.task_pop(scheduler_id="boefje", filters={"n": 2})
    services.task_start(task_id=running.id)
    done = push(data={"n": 3})
    services.task_pop(scheduler_id="boefje", filters={"n": 3})
    services.task_complete(task_id=done.id)

    response = admin_client.post(
        "/admin/tasks/task/",
        {"action": "cancel_tasks", "_selected_action": [queued.id, running.id, done.id]},
        follow=True,
    )

    assert response.status_code == 200
    assert Task.objects.get(id=queued.id).status == S.CANCELLED
    running_row = Task.objects.get(id=running.id)
    assert running_row.status == S.RUNNING and running_row.cancel_requested_at is not None
    assert Task.objects.get(id=done.id).status == S.COMPLETED
    messages = _messages(response)
    assert "Cancelled 2." in messages
    assert any("COMPLETED" in m and "CANCELLED" in m for m in messages), messages
    assert running_row.events.filter(actor="root", note="cancel requested").exists()


@pytest.mark.django_db
def test_admin_task_actions__requeue(admin_client: Client, push: Push) -> None:
    dead = _finish(push, 1, dead_letter=True)
    failed = _finish(push, 2, dead_letter=False)
    queued = push(data={"n": 3})

    response = admin_client.post(
        "/admin/tasks/task/",
        {"action": "requeue_tasks", "_selected_action": [dead.id, failed.id, queued.id]},
        follow=True,
    )

    statuses = dict(Task.objects.values_list("id", "status"))
    assert statuses == {dead.id: S.QUEUED, failed.id: S.QUEUED, queued.id: S.QUEUED}
    assert Task.objects.get(id=dead.id).attempts == 0
    messages = _messages(response)
    assert "Requeued 2." in messages and len(messages) == 2


@pytest.mark.django_db
def test_admin_task_actions__need_change_permission(push: Push) -> None:
    from django.contrib.auth.models import Permission

    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_task"))
    client = Client()
    client.force_login(viewer)
    task = push()

    page = client.get("/admin/tasks/task/")
    assert page.status_code == 200 and "cancel_tasks" not in page.content.decode()
    client.post("/admin/tasks/task/", {"action": "cancel_tasks", "_selected_action": [task.id]})
    assert Task.objects.get(id=task.id).status == S.QUEUED


@pytest.mark.django_db
def test_admin_dead_letters_filter(admin_client: Client, push: Push) -> None:
    dead = _finish(push, 1, dead_letter=True)
    failed = _finish(push, 2, dead_letter=False)
    queued = push(data={"n": 3})

    response = admin_client.get("/admin/tasks/task/?dead_letters=yes")

    assert response.status_code == 200
    assert [t.id for t in response.context["cl"].result_list] == [dead.id]
    page = response.content.decode()
    assert str(dead.id) in page
    assert str(failed.id) not in page and str(queued.id) not in page
    everything = admin_client.get("/admin/tasks/task/")
    assert len(everything.context["cl"].result_list) == 3


@pytest.mark.django_db
def test_admin_scheduler__a_system_queue_has_no_delete(
    admin_client: Client, make_scheduler: Callable[..., Scheduler]
) -> None:
    make_scheduler("system-queue", system=True)
    make_scheduler("ordinary")

    change = admin_client.get("/admin/tasks/scheduler/system-queue/change/")
    delete_page = admin_client.get("/admin/tasks/scheduler/system-queue/delete/")
    delete_post = admin_client.post("/admin/tasks/scheduler/system-queue/delete/", {"post": "yes"})
    bulk = admin_client.post(
        "/admin/tasks/scheduler/",
        {"action": "delete_selected", "_selected_action": ["system-queue"], "post": "yes"},
    )
    ordinary = admin_client.post("/admin/tasks/scheduler/ordinary/delete/", {"post": "yes"})

    assert change.status_code == 200
    assert "/delete/" not in change.content.decode()
    assert (delete_page.status_code, delete_post.status_code, bulk.status_code) == (403, 403, 403)
    assert ordinary.status_code == 302
    remaining = Scheduler.objects.filter(id__in=["system-queue", "ordinary"])
    assert list(remaining.values_list("id", flat=True)) == ["system-queue"]


def _change_form(client: Client, url: str) -> dict[str, object]:
    """The change page's form as the browser would post it back, unchanged."""
    form = client.get(url).context["adminform"].form
    data: dict[str, object] = {}
    for name in form.fields:
        value = form[name].value()  # already prepared for the widget (JSON as text)
        if isinstance(value, bool):
            if value:
                data[name] = "on"
        elif value is not None:
            data[name] = value
    return data


@pytest.mark.django_db
def test_admin_scheduler_change__the_id_is_read_only(
    admin_client: Client, make_scheduler: Callable[..., Scheduler], push: Push
) -> None:
    push()  # boefje has a task: a second, empty "boefje-renamed" would strand it
    url = "/admin/tasks/scheduler/boefje/change/"
    form = _change_form(admin_client, url)
    form.update({"id": "boefje-renamed", "description": "edited"})

    response = admin_client.post(url, form)

    assert response.status_code == 302, response.context["adminform"].form.errors
    assert not Scheduler.objects.filter(id="boefje-renamed").exists()
    assert Scheduler.objects.get(id="boefje").description == "edited"
    assert 'name="id"' in admin_client.get("/admin/tasks/scheduler/add/").content.decode()


@pytest.mark.django_db
def test_admin_task_changelist__newest_first_to_the_second(
    admin_client: Client, scheduler: Scheduler
) -> None:
    # Ids in the opposite order to creation: a list in id (UUID) order would be oldest first.
    t0 = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
    made = {
        n: Task.objects.create(
            id=uuid.UUID(int=n), scheduler=scheduler, created_at=t0 + timedelta(seconds=s)
        )
        for n, s in [(1, 7), (2, 3), (3, 3), (4, 0)]
    }

    response = admin_client.get("/admin/tasks/task/")

    assert [t.id for t in response.context["cl"].result_list] == [
        made[n].id
        for n in (1, 3, 2, 4)  # equal created_at: the higher id first
    ]
    page = response.content.decode()
    assert '<td class="field-created">2030-01-01 10:00:07</td>' in page
    assert '<td class="field-created">2030-01-01 10:00:03</td>' in page
    assert '<td class="field-lease_expires">-</td>' in page  # none was ever leased


@pytest.mark.django_db
def test_admin_task_actions__requeue_refuses_a_leased_task_naming_its_status(
    admin_client: Client, push: Push
) -> None:
    task = push(data={"n": 1})
    [popped] = services.task_pop(scheduler_id=task.scheduler_id)
    services.task_start(task_id=popped.id)

    response = admin_client.post(
        "/admin/tasks/task/",
        {"action": "requeue_tasks", "_selected_action": [task.id]},
        follow=True,
    )

    task = Task.objects.get(id=task.id)
    assert (task.status, task.attempts) == (S.RUNNING, 1)  # attempts not reset to 0
    assert any("RUNNING" in message for message in _messages(response))
