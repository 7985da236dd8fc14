"""The writer module's scheduler read (transitions.get_scheduler): every push reads its
scheduler through a statement compiled once per process, which must load what the ORM loads."""

from __future__ import annotations

import pytest

from tasks.exceptions import SchedulerNotFound
from tasks.models import Scheduler
from tasks.transitions import get_scheduler


@pytest.mark.django_db
def test_get_scheduler__loads_every_field_as_the_orm_does() -> None:
    Scheduler.objects.create(
        id="read-me",
        kind="pull",
        description="all fields set",
        max_queue_size=7,
        policy_weights={"a": 2, "b": [1, None]},
        rate_limit="5/s",
        concurrency_key="org",
        concurrency_limit=3,
        fair_key="user",
        paused=True,
    )
    for for_update in (False, True):
        read = get_scheduler("read-me", for_update=for_update)
        orm = Scheduler.objects.get(id="read-me")
        for field in Scheduler._meta.concrete_fields:
            assert getattr(read, field.attname) == getattr(orm, field.attname), field.name
        assert read._state.adding is False and read._state.db == "default"


@pytest.mark.django_db
def test_get_scheduler__a_missing_id_is_scheduler_not_found() -> None:
    for for_update in (False, True):
        with pytest.raises(SchedulerNotFound, match="'nope'"):
            get_scheduler("nope", for_update=for_update)
