"""Schedule validation (each error names its field), due-time arithmetic, and the orchestrator's
policy weights on Scheduler."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from schedules import services
from schedules.exceptions import ScheduleStateError
from schedules.models import Schedule
from tasks.models import Scheduler
from tests.schedules.helpers import T0


def _schedule(**fields: Any) -> Schedule:
    fields.setdefault("scheduler_id", "boefje")
    return Schedule(created_at=T0, modified_at=T0, **fields)


def _errors(schedule: Schedule) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as caught:
        schedule.full_clean()
    return caught.value.message_dict


# --- validation --------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({}, "cron", "got none"),
        ({"cron": "* * * * *", "interval_seconds": 60}, "cron", "interval_seconds"),
        ({"interval_seconds": 60, "run_at": T0}, "interval_seconds", "run_at"),
        ({"cron": "* * * *"}, "cron", "5 fields"),
        ({"cron": "61 * * * *"}, "cron", "not valid"),
        ({"interval_seconds": 60, "timezone": "Mars/Olympus_Mons"}, "timezone", "IANA"),
        ({"interval_seconds": 0}, "interval_seconds", ""),
        (
            {"interval_seconds": 60, "start_at": T0, "end_at": T0 - timedelta(seconds=1)},
            "end_at",
            "after start_at",
        ),
        ({"interval_seconds": 60, "start_at": T0, "end_at": T0}, "end_at", "after start_at"),
        ({"interval_seconds": 60, "backoff_factor": 2.0}, "backoff_factor", "together"),
        (
            {"interval_seconds": 60, "min_interval_seconds": 10, "max_interval_seconds": 100},
            "backoff_factor",
            "together",
        ),
        (
            {
                "cron": "* * * * *",
                "min_interval_seconds": 10,
                "max_interval_seconds": 100,
                "backoff_factor": 2.0,
            },
            "backoff_factor",
            "interval_seconds",
        ),
        (
            {
                "interval_seconds": 60,
                "min_interval_seconds": 100,
                "max_interval_seconds": 10,
                "backoff_factor": 2.0,
            },
            "max_interval_seconds",
            "min_interval_seconds",
        ),
    ],
)
def test_schedule_clean__names_the_field(
    scheduler: Scheduler, fields: dict[str, Any], field: str, words: str
) -> None:
    errors = _errors(_schedule(**fields))

    assert field in errors, errors
    assert words in " ".join(errors[field])


@pytest.mark.django_db
@pytest.mark.parametrize(
    "fields",
    [
        {"cron": "*/15 9-17 * * 1-5", "timezone": "Europe/Amsterdam"},
        {"interval_seconds": 1},
        {"run_at": T0},
        {
            "interval_seconds": 60,
            "min_interval_seconds": 60,
            "max_interval_seconds": 60,
            "backoff_factor": 1.0,
        },
        {"interval_seconds": 60, "start_at": T0, "end_at": T0 + timedelta(days=1)},
    ],
)
def test_schedule_clean__accepts_valid_schedules(
    scheduler: Scheduler, fields: dict[str, Any]
) -> None:
    _schedule(**fields).full_clean()


@pytest.mark.django_db
def test_schedule_clean__hash_taken_in_the_same_scheduler_names_hash(
    make_scheduler: Any, make_schedule: Any
) -> None:
    existing = make_schedule(hash="acme")
    make_scheduler("other")

    errors = _errors(_schedule(hash="acme", interval_seconds=60))

    assert "hash" in errors and "__all__" not in errors, errors
    _schedule(scheduler_id="other", hash="acme", interval_seconds=60).full_clean()
    existing.full_clean()  # its own hash does not count


# --- due times ---------------------------------------------------------------------------------


def test_first_deadline__cron_is_the_next_occurrence_in_its_time_zone() -> None:
    # 09:00 in Amsterdam: 08:00Z in winter (CET), 07:00Z in summer (CEST).
    schedule = _schedule(cron="0 9 * * *", timezone="Europe/Amsterdam")

    assert schedule.first_deadline(now=T0) == datetime(2030, 1, 2, 8, 0, tzinfo=UTC)
    summer = datetime(2030, 7, 1, 6, 0, tzinfo=UTC)
    assert schedule.first_deadline(now=summer) == datetime(2030, 7, 1, 7, 0, tzinfo=UTC)


def test_first_deadline__cron_occurrence_exactly_now_is_due_now() -> None:
    schedule = _schedule(cron="5 10 * * *")

    assert schedule.first_deadline(now=T0) == T0
    assert schedule.next_occurrence(after=T0) == T0 + timedelta(days=1)


def test_next_occurrence__cron_steps_through_occurrences() -> None:
    schedule = _schedule(cron="*/15 * * * *", timezone="Asia/Kolkata")  # +05:30

    assert schedule.next_occurrence(after=T0) == T0.replace(minute=15)
    assert schedule.next_occurrence(after=T0.replace(minute=15)) == T0.replace(minute=30)


def test_first_deadline__interval_is_due_now_when_it_never_ran() -> None:
    assert _schedule(interval_seconds=300).first_deadline(now=T0) == T0


def test_next_occurrence__interval_keeps_its_grid_when_ticks_are_late() -> None:
    schedule = _schedule(interval_seconds=60, deadline_at=T0)

    # A tick 5 s late: the next run is still on the grid T0 + k·60, not at tick + 60.
    assert schedule.next_occurrence(after=T0 + timedelta(seconds=5)) == T0 + timedelta(minutes=1)
    # After downtime, missed points are skipped: the first grid point after now.
    late = T0 + timedelta(minutes=5, seconds=30)
    assert schedule.next_occurrence(after=late) == T0 + timedelta(minutes=6)
    # Exactly on a grid point: strictly after it.
    assert schedule.next_occurrence(after=T0 + timedelta(minutes=2)) == T0 + timedelta(minutes=3)


def test_first_deadline__interval_that_ran_follows_its_last_run_not_the_old_deadline() -> None:
    # As after an edit from 1 h to 1 min: the stored deadline is the old one, an hour away.
    schedule = _schedule(interval_seconds=60, last_run_at=T0, deadline_at=T0 + timedelta(hours=1))

    assert schedule.first_deadline(now=T0 + timedelta(seconds=30)) == T0 + timedelta(minutes=1)
    assert schedule.first_deadline(now=T0 + timedelta(minutes=5, seconds=30)) == T0 + timedelta(
        minutes=6
    )
    schedule.end_at = T0 + timedelta(minutes=5)
    assert schedule.first_deadline(now=T0 + timedelta(minutes=5, seconds=30)) is None


def test_next_occurrence__interval_grid_anchored_at_start_at() -> None:
    start = T0 + timedelta(seconds=7)
    schedule = _schedule(interval_seconds=100, start_at=start, deadline_at=T0 + timedelta(hours=1))

    assert schedule.next_occurrence(after=T0 + timedelta(seconds=250)) == start + timedelta(
        seconds=300
    )


def test_first_deadline__one_off_is_its_run_at_until_it_ran() -> None:
    run_at = T0 + timedelta(hours=2)
    schedule = _schedule(run_at=run_at)

    assert schedule.first_deadline(now=T0) == run_at
    # A one-off in the past is due at once (it never ran).
    assert schedule.first_deadline(now=run_at + timedelta(days=1)) == run_at
    assert schedule.next_occurrence(after=T0) is None
    schedule.last_run_at = run_at
    assert schedule.first_deadline(now=run_at + timedelta(minutes=1)) is None


def test_first_deadline__start_at_in_the_future_is_respected() -> None:
    start = T0 + timedelta(days=3, minutes=7)

    assert _schedule(interval_seconds=60, start_at=start).first_deadline(now=T0) == start
    # Cron: the first occurrence at or after start_at.
    assert _schedule(cron="*/10 * * * *", start_at=start).first_deadline(now=T0) == start.replace(
        minute=20
    )
    assert _schedule(cron="*/10 * * * *", start_at=start.replace(minute=10)).first_deadline(
        now=T0
    ) == start.replace(minute=10)


def test_next_occurrence__none_once_end_at_is_reached() -> None:
    end = T0 + timedelta(seconds=90)
    interval = _schedule(interval_seconds=60, deadline_at=T0, end_at=end)

    assert interval.next_occurrence(after=T0) == T0 + timedelta(seconds=60)
    assert interval.next_occurrence(after=T0 + timedelta(seconds=60)) is None
    assert interval.first_deadline(now=end + timedelta(seconds=1)) is None

    cron = _schedule(cron="0 * * * *", end_at=T0 + timedelta(hours=1))
    assert cron.first_deadline(now=T0) == T0.replace(hour=11, minute=0)
    assert cron.next_occurrence(after=T0.replace(hour=11, minute=0)) is None


def test_task_hash__is_the_hash_or_derived_from_the_id() -> None:
    schedule_id = uuid.uuid4()

    assert _schedule(id=schedule_id, hash="org1-dns").task_hash == "org1-dns"
    assert _schedule(id=schedule_id).task_hash == f"schedule:{schedule_id}"
    assert len(_schedule(id=schedule_id).task_hash) <= 64  # fits Task.hash


# --- Scheduler.policy_weights ------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("weights", "words"),
    [
        ({"fastest_first": 1}, "unknown policies"),
        ({"never_run_first": -1}, "whole numbers"),
        ({"never_run_first": True}, "whole numbers"),
        ({"never_run_first": 1.5}, "whole numbers"),
        ({"never_run_first": 0, "most_overdue_first": 0}, "above 0"),
        ({}, "object"),
        (["never_run_first"], "object"),
    ],
)
def test_scheduler_policy_weights__refused(weights: Any, words: str) -> None:
    scheduler = Scheduler(id="weights", policy_weights=weights)

    with pytest.raises(ValidationError) as caught:
        scheduler.full_clean()

    assert words in " ".join(caught.value.message_dict["policy_weights"])


@pytest.mark.django_db
def test_scheduler_policy_weights__defaults_and_valid_weights_pass() -> None:
    Scheduler(id="defaults").full_clean()
    Scheduler(
        id="custom", policy_weights={"never_run_first": 0, "highest_priority_first": 3}
    ).full_clean()


# --- the state machine on the model -----------------------------------------------------------


@pytest.mark.django_db
def test_schedule_methods__pause_resume_finish_with_events() -> None:
    Scheduler.objects.create(id="boefje")
    schedule = services.schedule_create(scheduler_id="boefje", interval_seconds=60, actor="op")

    paused = schedule.pause(actor="op")
    resumed = paused.resume(actor="op")
    finished = resumed.finish(actor="op")

    assert (paused.status, resumed.status, finished.status) == ("PAUSED", "ACTIVE", "FINISHED")
    assert finished.deadline_at is None
    steps = list(schedule.events.values_list("from_status", "to_status", "actor"))
    assert steps == [
        ("", "ACTIVE", "op"),
        ("ACTIVE", "PAUSED", "op"),
        ("PAUSED", "ACTIVE", "op"),
        ("ACTIVE", "FINISHED", "op"),
    ]
    with pytest.raises(ScheduleStateError):
        finished.pause()  # FINISHED -> PAUSED is not in the table
