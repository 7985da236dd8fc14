"""A schedule named at a shell by its id, name, hash or a unique prefix of its id (issue 13,
part 5; DESIGN 9.5)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from schedules.exceptions import ScheduleNotFound
from schedules.models import Schedule
from schedules.selectors import resolve_schedule
from tasks.exceptions import InvalidRequest
from tasks.models import Scheduler

pytestmark = pytest.mark.django_db
Make = Callable[..., Schedule]


def show(*args: str) -> dict[str, object]:
    out = StringIO()
    call_command("schedule", "show", *args, "--json", stdout=out)
    return json.loads(out.getvalue())


def test_resolve_schedule__id_name_hash_or_prefix(make_schedule: Make) -> None:
    one = make_schedule(name="nightly", hash="acme-nightly")
    make_schedule(name="other", hash="other-hash")

    assert resolve_schedule(str(one.id)) == one
    assert resolve_schedule("nightly") == one
    assert resolve_schedule("acme-nightly") == one
    assert resolve_schedule(one.id.hex[:12]) == one
    assert show("acme-nightly")["id"] == str(one.id)


def test_resolve_schedule__a_name_wins_over_another_schedules_hash(make_schedule: Make) -> None:
    named = make_schedule(name="shared")
    make_schedule(hash="shared")
    assert resolve_schedule("shared") == named


def test_resolve_schedule__a_hash_in_several_queues_needs_scheduler(
    make_scheduler: Callable[..., Scheduler], make_schedule: Make
) -> None:
    make_scheduler("other")
    mine = make_schedule(hash="h1")
    make_schedule(scheduler_id="other", hash="h1")

    with pytest.raises(InvalidRequest, match=r"several schedulers \(boefje, other\)"):
        resolve_schedule("h1")
    assert resolve_schedule("h1", scheduler_id="boefje") == mine
    assert show("h1", "--scheduler", "boefje")["id"] == str(mine.id)


def test_resolve_schedule__an_ambiguous_prefix_names_the_candidates(scheduler: Scheduler) -> None:
    ids = [uuid.UUID("facade00-0000-4000-8000-00000000000" + str(n)) for n in (1, 2)]
    for schedule_id in ids:
        # Rows written directly: the ids must share a prefix, which uuid4 never arranges.
        Schedule.objects.create(id=schedule_id, scheduler=scheduler, interval_seconds=60)

    with pytest.raises(CommandError) as raised:
        show("facade")
    assert all(str(schedule_id) in str(raised.value) for schedule_id in ids)
    assert show("facade00-0000-4000-8000-000000000002")["id"] == str(ids[1])


def test_resolve_schedule__nothing_matches(make_schedule: Make) -> None:
    make_schedule(name="nightly")
    with pytest.raises(ScheduleNotFound, match="No schedule has the id, name, hash or id prefix"):
        resolve_schedule("weekly")
    with pytest.raises(CommandError, match="HTTP equivalent: 404"):
        show("0000")
