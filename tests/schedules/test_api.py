"""/api/schedules/ through DRF's APIClient: CRUD, field-named 400s, filters, cursor pages, the
pause/resume/trigger actions, permissions, and /api/tasks/?schedule=."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils.dateparse import parse_datetime
from rest_framework.test import APIClient
from time_machine import TimeMachineFixture

from schedules import services
from schedules.models import Schedule, ScheduleStatus
from tasks import services as task_services
from tasks.models import Scheduler, Task
from tests.schedules.helpers import T0

pytestmark = pytest.mark.django_db

URL = "/api/schedules/"
Make = Callable[..., Schedule]


@pytest.fixture(autouse=True)
def _no_server_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every response of these tests must be below 500, whatever the input."""
    original = APIClient.request

    def request(self: APIClient, **kwargs: Any) -> Any:
        response = original(self, **kwargs)
        assert response.status_code < 500, (kwargs.get("PATH_INFO"), response.content[:500])
        return response

    monkeypatch.setattr(APIClient, "request", request)


def at(value: str | None) -> datetime | None:
    return parse_datetime(value) if value else None


def create(client: APIClient, **body: Any) -> Any:
    body.setdefault("scheduler", "boefje")
    return client.post(URL, body, format="json")


# --- create ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "deadline"),
    [
        ({"interval_seconds": 300}, T0),
        (
            {"cron": "0 9 * * *", "timezone": "Europe/Amsterdam"},
            T0.replace(day=2, hour=8, minute=0),
        ),
        ({"run_at": "2030-01-01T12:00:00+01:00"}, T0.replace(hour=11, minute=0)),
    ],
)
def test_schedule_create__each_kind(
    clock: TimeMachineFixture,
    operator_client: APIClient,
    scheduler: Scheduler,
    body: dict[str, Any],
    deadline: datetime,
) -> None:
    response = create(operator_client, data={"org": "acme"}, priority=2, **body)

    assert response.status_code == 201, response.json()
    answer = response.json()
    assert answer["status"] == ScheduleStatus.ACTIVE
    assert at(answer["deadline_at"]) == deadline
    assert (answer["scheduler"], answer["data"], answer["priority"]) == (
        "boefje",
        {"org": "acme"},
        2,
    )
    assert (answer["run_count"], answer["last_run_at"]) == (0, None)
    stored = Schedule.objects.get(id=answer["id"])
    assert stored.deadline_at == deadline


def test_schedule_create__cron_is_described_and_normalised(
    clock: TimeMachineFixture, operator_client: APIClient, scheduler: Scheduler
) -> None:
    response = create(operator_client, cron="  */15   *  * * * ")

    assert response.status_code == 201
    assert response.json()["cron"] == "*/15 * * * *"
    assert response.json()["cron_description"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * * *"}, "cron"),
        ({"cron": "1 1 */100 * MON#4"}, "cron"),  # valid but never matches: was a 500
        ({"interval_seconds": 60, "timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"cron": "* * * * *", "interval_seconds": 60}, "cron"),
        ({"interval_seconds": 60, "run_at": "2030-01-02T00:00:00Z"}, "interval_seconds"),
        ({}, "cron"),
        ({"interval_seconds": 0}, "interval_seconds"),
        ({"interval_seconds": -5}, "interval_seconds"),
        (
            {
                "interval_seconds": 60,
                "start_at": "2030-01-02T00:00:00Z",
                "end_at": "2030-01-01T00:00:00Z",
            },
            "end_at",
        ),
        ({"interval_seconds": 60, "scheduler": "nope"}, "scheduler"),
        ({"interval_seconds": 60, "data": [1, 2]}, "data"),
        ({"interval_seconds": 60, "data": "text"}, "data"),
        ({"interval_seconds": 60, "run_at": "tomorrow"}, "run_at"),
        ({"interval_seconds": 60, "backoff_factor": 2}, "backoff_factor"),
        ({"interval_seconds": 60, "hash": "x" * 65}, "hash"),
    ],
)
def test_schedule_create__bad_input_is_400_naming_the_field(
    clock: TimeMachineFixture,
    operator_client: APIClient,
    scheduler: Scheduler,
    body: dict[str, Any],
    field: str,
) -> None:
    response = create(operator_client, **body)

    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert not Schedule.objects.exists()


def test_schedule_create__duplicate_hash_in_the_same_scheduler_is_400_naming_hash(
    clock: TimeMachineFixture,
    operator_client: APIClient,
    make_scheduler: Callable[..., Scheduler],
    scheduler: Scheduler,
) -> None:
    make_scheduler("other")
    assert create(operator_client, interval_seconds=60, hash="acme").status_code == 201
    assert (
        create(operator_client, interval_seconds=60, hash="acme", scheduler="other").status_code
        == 201
    )

    response = create(operator_client, interval_seconds=60, hash="acme")

    assert response.status_code == 400
    assert "hash" in response.json(), response.json()
    assert Schedule.objects.count() == 2


# --- list, filters, pages ----------------------------------------------------------------------


def _ids(response: Any) -> set[str]:
    assert response.status_code == 200, response.json()
    return {row["id"] for row in response.json()["results"]}


def test_schedule_list__filters(
    clock: TimeMachineFixture,
    operator_client: APIClient,
    make_scheduler: Callable[..., Scheduler],
    make_schedule: Make,
) -> None:
    make_scheduler("other")
    now = make_schedule(interval_seconds=60, hash="a")  # due T0
    later = make_schedule(cron="0 12 * * *", hash="b")  # due 12:00
    paused = make_schedule(interval_seconds=60)
    services.schedule_pause(schedule_id=paused.id)
    elsewhere = make_schedule(scheduler_id="other", interval_seconds=60, hash="a")
    ids = {str(s.id) for s in (now, later, paused, elsewhere)}

    assert _ids(operator_client.get(URL)) == ids
    assert _ids(operator_client.get(URL, {"scheduler": "other"})) == {str(elsewhere.id)}
    assert _ids(operator_client.get(URL, {"status": "PAUSED"})) == {str(paused.id)}
    assert _ids(operator_client.get(f"{URL}?status=PAUSED&status=ACTIVE")) == ids
    assert _ids(operator_client.get(URL, {"hash": "a"})) == {str(now.id), str(elsewhere.id)}
    assert _ids(operator_client.get(URL, {"scheduler": "boefje", "hash": "a"})) == {str(now.id)}
    assert _ids(operator_client.get(URL, {"due_before": "2030-01-01T10:05:00Z"})) == {
        str(now.id),
        str(elsewhere.id),
    }
    assert _ids(operator_client.get(URL, {"due_after": "2030-01-01T11:00:00Z"})) == {str(later.id)}


@pytest.mark.parametrize(
    "query",
    [{"due_before": "yesterday"}, {"due_after": "2030-13-45T00:00:00Z"}, {"status": "SLEEPING"}],
)
def test_schedule_list__bad_filter_is_400(
    operator_client: APIClient, make_schedule: Make, query: dict[str, str]
) -> None:
    make_schedule()

    response = operator_client.get(URL, query)

    assert response.status_code == 400
    assert set(response.json()) == set(query)


def test_schedule_list__cursor_pages(operator_client: APIClient, make_schedule: Make) -> None:
    made = {str(make_schedule().id) for _ in range(5)}
    seen: list[str] = []
    url: str | None = f"{URL}?page_size=2"

    while url:
        page = operator_client.get(url).json()
        assert len(page["results"]) <= 2
        assert "count" not in page
        seen += [row["id"] for row in page["results"]]
        url = page["next"]

    assert len(seen) == 5
    assert set(seen) == made


# --- retrieve, update, delete ------------------------------------------------------------------


def test_schedule_patch__recomputes_the_deadline(
    clock: TimeMachineFixture, operator_client: APIClient, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *")  # due 11:00
    clock.move_to(T0 + timedelta(minutes=5), tick=False)  # 10:10

    response = operator_client.patch(
        f"{URL}{schedule.id}/", {"cron": "30 * * * *", "priority": 7}, format="json"
    )

    assert response.status_code == 200, response.json()
    assert at(response.json()["deadline_at"]) == T0.replace(minute=30)
    assert response.json()["priority"] == 7
    stored = Schedule.objects.get(id=schedule.id)
    assert (stored.cron, stored.deadline_at) == ("30 * * * *", T0.replace(minute=30))


def test_schedule_patch__switching_kind_and_bad_edits(
    clock: TimeMachineFixture, operator_client: APIClient, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *")
    url = f"{URL}{schedule.id}/"

    refused = operator_client.patch(url, {"interval_seconds": 60}, format="json")
    assert refused.status_code == 400 and "cron" in refused.json()
    assert operator_client.patch(url, {"timezone": "Nowhere"}, format="json").status_code == 400
    never = operator_client.patch(url, {"cron": "1 1 */100 * MON#4"}, format="json")
    assert never.status_code == 400 and "never matches" in never.json()["cron"][0]
    assert Schedule.objects.get(id=schedule.id).interval_seconds is None
    assert Schedule.objects.get(id=schedule.id).cron == "0 * * * *"

    switched = operator_client.patch(url, {"cron": "", "interval_seconds": 60}, format="json")
    assert switched.status_code == 200, switched.json()
    assert at(switched.json()["deadline_at"]) == T0  # never ran: due now


def test_schedule_patch__cannot_move_it_to_another_scheduler(
    operator_client: APIClient, make_scheduler: Callable[..., Scheduler], make_schedule: Make
) -> None:
    make_scheduler("other")
    schedule = make_schedule()

    response = operator_client.patch(f"{URL}{schedule.id}/", {"scheduler": "other"}, format="json")

    # Refused, not dropped: a 200 let the client believe the schedule had moved.
    assert response.status_code == 400 and list(response.json()) == ["scheduler"]
    assert Schedule.objects.get(id=schedule.id).scheduler_id == "boefje"


def test_schedule_retrieve_and_delete(
    clock: TimeMachineFixture, operator_client: APIClient, make_schedule: Make
) -> None:
    schedule = make_schedule()
    services.orchestrate()
    url = f"{URL}{schedule.id}/"
    assert operator_client.get(url).json()["run_count"] == 1

    assert operator_client.delete(url).status_code == 204

    assert operator_client.get(url).status_code == 404
    assert not Schedule.objects.exists()
    assert Task.objects.get().schedule_id is None  # its task stays
    assert operator_client.delete(url).status_code == 404


# --- actions -----------------------------------------------------------------------------------


def test_schedule_pause_and_resume(
    clock: TimeMachineFixture, operator_client: APIClient, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *")

    paused = operator_client.post(f"{URL}{schedule.id}/pause/")
    assert paused.status_code == 200
    assert (paused.json()["status"], paused.json()["deadline_at"]) == ("PAUSED", None)

    clock.move_to(T0.replace(hour=15, minute=30), tick=False)
    resumed = operator_client.post(f"{URL}{schedule.id}/resume/")
    assert resumed.status_code == 200
    assert resumed.json()["status"] == "ACTIVE"
    assert at(resumed.json()["deadline_at"]) == T0.replace(hour=16, minute=0)


def test_schedule_pause__a_finished_schedule_is_409(
    clock: TimeMachineFixture, operator_client: APIClient, make_schedule: Make
) -> None:
    schedule = make_schedule(run_at=T0)
    services.orchestrate()

    response = operator_client.post(f"{URL}{schedule.id}/pause/")

    assert response.status_code == 409
    assert "detail" in response.json()
    assert Schedule.objects.get(id=schedule.id).status == ScheduleStatus.FINISHED


def test_schedule_trigger__201_then_409_while_active(
    clock: TimeMachineFixture, operator_client: APIClient, make_schedule: Make
) -> None:
    schedule = make_schedule(cron="0 * * * *", data={"org": "acme"})
    url = f"{URL}{schedule.id}/trigger/"

    first = operator_client.post(url)
    assert first.status_code == 201, first.json()
    task = first.json()
    assert (task["status"], task["schedule"], task["data"]) == (
        "QUEUED",
        str(schedule.id),
        {"org": "acme"},
    )

    second = operator_client.post(url)
    assert second.status_code == 409
    assert second.json()["existing_id"] == task["id"]
    assert Task.objects.count() == 1
    stored = Schedule.objects.get(id=schedule.id)
    assert (stored.run_count, stored.deadline_at) == (1, T0.replace(hour=11, minute=0))


def test_schedule_trigger__full_queue_is_429(
    clock: TimeMachineFixture,
    operator_client: APIClient,
    make_scheduler: Callable[..., Scheduler],
    make_schedule: Make,
) -> None:
    make_scheduler("small", max_queue_size=1)
    task_services.task_push(scheduler_id="small")
    schedule = make_schedule(scheduler_id="small", cron="0 * * * *")

    response = operator_client.post(f"{URL}{schedule.id}/trigger/")

    assert response.status_code == 429
    assert not Task.objects.filter(schedule=schedule).exists()
    assert Schedule.objects.get(id=schedule.id).run_count == 0


@pytest.mark.parametrize("action", ["", "pause/", "resume/", "trigger/"])
@pytest.mark.parametrize(
    "schedule_id",
    [
        str(uuid.uuid4()),
        "not-a-uuid",
        "0123456789abcdef0123456789abcdef0",  # 33 hex digits
        "-" * 36,
        "0123456789abcdef0123456789abcdeg",
    ],
)
def test_schedule_actions__unknown_or_malformed_id_is_404(
    operator_client: APIClient, scheduler: Scheduler, action: str, schedule_id: str
) -> None:
    method = operator_client.get if not action else operator_client.post

    assert method(f"{URL}{schedule_id}/{action}").status_code == 404


# --- permissions -------------------------------------------------------------------------------


def test_schedules__anonymous_is_401(anon_client: APIClient, make_schedule: Make) -> None:
    schedule = make_schedule()

    assert anon_client.get(URL).status_code == 401
    assert create(anon_client, interval_seconds=60).status_code == 401
    for action in ("pause", "resume", "trigger"):
        assert anon_client.post(f"{URL}{schedule.id}/{action}/").status_code == 401
    assert anon_client.delete(f"{URL}{schedule.id}/").status_code == 401
    assert Schedule.objects.get(id=schedule.id).status == ScheduleStatus.ACTIVE


def test_schedules__runner_is_403(runner_client: APIClient, make_schedule: Make) -> None:
    schedule = make_schedule()

    assert create(runner_client, interval_seconds=60).status_code == 403
    for action in ("pause", "resume", "trigger"):
        assert runner_client.post(f"{URL}{schedule.id}/{action}/").status_code == 403
    assert runner_client.get(URL).status_code == 403
    assert (
        runner_client.patch(f"{URL}{schedule.id}/", {"priority": 1}, format="json").status_code
        == 403
    )
    assert runner_client.delete(f"{URL}{schedule.id}/").status_code == 403
    assert Schedule.objects.count() == 1
    assert not Task.objects.exists()


def test_schedules__operator_may_do_everything(
    clock: TimeMachineFixture, operator_client: APIClient, scheduler: Scheduler
) -> None:
    created = create(operator_client, cron="0 * * * *")
    assert created.status_code == 201
    url = f"{URL}{created.json()['id']}/"

    assert operator_client.get(URL).status_code == 200
    assert operator_client.get(url).status_code == 200
    assert operator_client.patch(url, {"priority": 3}, format="json").status_code == 200
    assert operator_client.post(f"{url}trigger/").status_code == 201
    assert operator_client.post(f"{url}pause/").status_code == 200
    assert operator_client.post(f"{url}resume/").status_code == 200
    assert operator_client.delete(url).status_code == 204


# --- tasks of a schedule -----------------------------------------------------------------------


def test_tasks_api__filter_by_schedule(
    clock: TimeMachineFixture, operator_client: APIClient, make_schedule: Make, push: Any
) -> None:
    mine = make_schedule(data={"s": "mine"})
    other = make_schedule(data={"s": "other"})
    services.orchestrate()
    [popped] = task_services.task_pop(scheduler_id="boefje", filters={"s": "mine"})
    task_services.task_complete(task_id=popped.id)
    clock.shift(timedelta(minutes=1))
    services.orchestrate()  # a second task of mine; other's first one is still queued
    push(data={"manual": True})

    response = operator_client.get("/api/tasks/", {"schedule": str(mine.id)})

    expected = {str(t.id) for t in Task.objects.filter(schedule=mine)}
    assert len(expected) == 2
    assert _ids(response) == expected
    assert {row["schedule"] for row in response.json()["results"]} == {str(mine.id)}
    others = _ids(operator_client.get("/api/tasks/", {"schedule": str(other.id)}))
    assert len(others) == 1
    assert _ids(operator_client.get("/api/tasks/", {"schedule": str(uuid.uuid4())})) == set()
    assert len(_ids(operator_client.get("/api/tasks/"))) == 4
    bad = operator_client.get("/api/tasks/", {"schedule": "not-a-uuid"})
    assert bad.status_code == 400 and "schedule" in bad.json()
