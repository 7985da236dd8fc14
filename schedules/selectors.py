"""Reads of schedules that take more than a primary key: a reference that is an id or a name
(the API), or also a hash or an id prefix (commands)."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet

from schedules.exceptions import ScheduleNotFound
from schedules.models import Schedule
from tasks.exceptions import InvalidRequest
from tasks.references import as_prefix, by_id_prefix


def find_schedule(
    ref: str | uuid.UUID,
    *,
    scheduler_id: str | None = None,
    queryset: QuerySet[Schedule] | None = None,
) -> Schedule:
    """The schedule `ref` names: its id (a UUID), else its name. A name is unique per scheduler
    only: one used in several schedulers needs `scheduler_id` (InvalidRequest on `scheduler`,
    400, listing them); none is ScheduleNotFound (404)."""
    schedules = Schedule.objects.all() if queryset is None else queryset
    if scheduler_id:
        schedules = schedules.filter(scheduler_id=scheduler_id)
    where = f" in scheduler {scheduler_id!r}" if scheduler_id else ""
    try:
        schedule_id = ref if isinstance(ref, uuid.UUID) else uuid.UUID(ref)
    except ValueError:
        return _by_name(schedules, str(ref), where=where)
    found = schedules.filter(id=schedule_id).first()
    if found is None:
        raise ScheduleNotFound(f"Schedule {schedule_id} does not exist{where}.")
    return found


def _by_name(schedules: QuerySet[Schedule], name: str, *, where: str) -> Schedule:
    if len(name) > 200 or any(ord(char) < 32 for char in name):
        # No name is like that (and PostgreSQL refuses a NUL in a query): none, without asking.
        raise ScheduleNotFound(f"No schedule is named {name!r}{where}.")
    matches = list(schedules.filter(name=name).order_by("scheduler_id")[:10])
    if not matches:
        raise ScheduleNotFound(f"No schedule is named {name!r}{where}.")
    if len(matches) > 1:
        listed = ", ".join(schedule.scheduler_id for schedule in matches)
        raise InvalidRequest(
            "scheduler",
            f"schedules named {name!r} are in several schedulers ({listed}); say which one.",
        )
    return matches[0]


def resolve_schedule(ref: str, *, scheduler_id: str | None = None) -> Schedule:
    """What a command takes for a schedule: its id or name (as the API), else its hash, else a
    unique prefix of its id (4+ hex digits). Name before hash: a name is what people give it;
    a hash shared by several schedulers, like a name, needs `scheduler_id`."""
    try:
        return find_schedule(ref, scheduler_id=scheduler_id)
    except ScheduleNotFound as not_found:
        schedules = Schedule.objects.all()
        if scheduler_id:
            schedules = schedules.filter(scheduler_id=scheduler_id)
        found = _by_hash(schedules, ref)
        prefix = as_prefix(ref)
        if found is None and prefix:
            found = by_id_prefix(schedules, prefix, noun="schedule")
        if found is None:
            where = f" in scheduler {scheduler_id!r}" if scheduler_id else ""
            raise ScheduleNotFound(
                f"No schedule has the id, name, hash or id prefix {ref!r}{where}."
            ) from not_found
        return found


def _by_hash(schedules: QuerySet[Schedule], ref: str) -> Schedule | None:
    if len(ref) > 64 or any(ord(char) < 32 for char in ref):
        return None  # no hash is like that (and PostgreSQL refuses a NUL in a query)
    matches = list(schedules.filter(hash=ref).order_by("scheduler_id")[:10])
    if len(matches) > 1:
        listed = ", ".join(schedule.scheduler_id for schedule in matches)
        raise InvalidRequest(
            "scheduler",
            f"schedules with hash {ref!r} are in several schedulers ({listed}); say which one.",
        )
    return matches[0] if matches else None
