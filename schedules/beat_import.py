"""django-celery-beat PeriodicTask rows → Schedules on `celery:<task>` queues (`manage.py
import_beat`). Idempotent: a PeriodicTask's schedule is found again by its name (the schedule's
`name`, unique per scheduler), so a re-run updates what changed and creates nothing twice.

Each PeriodicTask goes to the celery-kind scheduler of its task (and queue): id derived from
them (`reports-proj-tasks-send` for task `proj.tasks.send` on queue `reports`), created when
missing with handler `celery:<task>`. What has no equivalent here is reported, not guessed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from scheduler_site.periodic import system_jobs
from schedules import services, timing
from schedules.models import Schedule, ScheduleStatus
from tasks import services as task_services
from tasks.exceptions import QueueError
from tasks.models import Scheduler, SchedulerKind

SECONDS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1, "microseconds": 1e-6}
CREATED, UPDATED, UNCHANGED = "created", "updated", "unchanged"
NOT_CONVERTED, SKIPPED = "not converted", "skipped"
DST_NOTE = (
    "DST differs from beat: a local time that does not exist (spring forward) runs once at "
    "the jump, one that occurs twice (fall back) runs once"
)


class NotConverted(Exception):
    """Why a PeriodicTask has no Schedule here."""


@dataclass
class Row:
    name: str
    task: str
    schedule: str  # what it is in beat, in words
    scheduler: str = ""
    outcome: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def converted(self) -> bool:
        return self.outcome in {CREATED, UPDATED, UNCHANGED}


def import_periodic_tasks(
    *, dry_run: bool = False, disable_source: bool = False, paused: bool = False
) -> list[Row]:
    """Convert every PeriodicTask (in name order); with `dry_run` nothing is kept."""
    rows: list[Row] = []
    with transaction.atomic():
        for periodic in PeriodicTask.objects.select_related(
            "interval", "crontab", "solar", "clocked"
        ).order_by("name"):
            rows.append(_import_one(periodic, disable_source=disable_source, paused=paused))
        if dry_run:
            transaction.set_rollback(True)
    return rows


def _import_one(periodic: PeriodicTask, *, disable_source: bool, paused: bool) -> Row:
    row = Row(name=periodic.name, task=periodic.task, schedule=describe(periodic))
    if _is_system_job(periodic):
        row.outcome = SKIPPED
        row.notes.append("the scheduler's own periodic job (setup_periodic_tasks)")
        return row
    try:
        with transaction.atomic():
            fields = _fields(periodic, row)
            row.scheduler = _scheduler_for(periodic)
            row.outcome = _save(row.scheduler, periodic, fields, paused=paused)
            if disable_source and periodic.enabled:
                periodic.enabled = False
                periodic.save()  # save(), not update(): beat hears of it (its change signal)
                row.notes.append("disabled in beat")
    except NotConverted as exc:
        row.outcome, row.notes = NOT_CONVERTED, [str(exc), *row.notes]
    except (ValidationError, QueueError) as exc:
        row.outcome, row.notes = NOT_CONVERTED, [_reason(exc), *row.notes]
    return row


def _is_system_job(periodic: PeriodicTask) -> bool:
    jobs = system_jobs()
    return periodic.name in {job.name for job in jobs} or periodic.task in {j.task for j in jobs}


def _reason(exc: ValidationError | QueueError) -> str:
    if isinstance(exc, QueueError):
        return exc.message
    if hasattr(exc, "error_dict"):
        return "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
    return " ".join(exc.messages)


# --- what a PeriodicTask becomes -------------------------------------------------------------


def describe(periodic: PeriodicTask) -> str:
    if periodic.crontab:
        return f"crontab {_cron(periodic)} ({_zone_name(periodic.crontab.timezone)})"
    if periodic.interval:
        return f"every {periodic.interval.every} {periodic.interval.period}"
    if periodic.clocked:
        return f"clocked {periodic.clocked.clocked_time.isoformat()}"
    if periodic.solar:
        solar = periodic.solar
        return f"solar {solar.event} at ({solar.latitude}, {solar.longitude})"
    return "no schedule"


def _fields(periodic: PeriodicTask, row: Row) -> dict[str, Any]:
    """The Schedule's fields; notes on `row` for what does not carry over."""
    if "/" in periodic.name:
        raise NotConverted("its name has a '/': schedule names here cannot (rename it in beat)")
    fields: dict[str, Any] = {
        "name": periodic.name,
        "data": _data(periodic),
        "start_at": periodic.start_time,
        **_timing(periodic, row),
        **_expiry(periodic, row),
    }
    _note_what_is_left(periodic, row)
    return fields


def _expiry(periodic: PeriodicTask, row: Row) -> dict[str, Any]:
    """Beat's `expire_seconds` (its messages expire that long after sending) is the schedule's
    expire_seconds (counted from the occurrence); beat's `expires` (no run after it, and its
    messages expire then) ends the schedule there."""
    if periodic.expire_seconds:
        return {"expire_seconds": periodic.expire_seconds}
    if periodic.expires and not periodic.clocked:
        row.notes.append(
            f"expires {periodic.expires.isoformat()}: the schedule ends then (end_at); a task "
            "queued before it may still run after it"
        )
        return {"end_at": periodic.expires}
    return {}


def _timing(periodic: PeriodicTask, row: Row) -> dict[str, Any]:
    if periodic.solar:
        raise NotConverted(
            "solar schedules (sunrise, sunset … at a place) have no cron equivalent: keep it "
            "in beat, or write crons for its times"
        )
    if periodic.crontab:
        found = {"cron": _cron(periodic), "timezone": _zone_name(periodic.crontab.timezone)}
        try:
            timing.validate_cron(found["cron"])
        except timing.TimingError as exc:
            raise NotConverted(f"crontab {found['cron']!r}: {exc.message}") from None
        if _observes_dst(found["timezone"]) and "*" not in periodic.crontab.hour:
            row.notes.append(DST_NOTE)
    elif periodic.interval:
        found = {"interval_seconds": _interval_seconds(periodic), "timezone": "UTC"}
    elif periodic.clocked:
        return {"run_at": periodic.clocked.clocked_time, "timezone": "UTC"}
    else:
        raise NotConverted("it has no schedule (none of crontab, interval, clocked, solar)")
    if periodic.one_off:
        return _one_off(periodic, found, row)
    return found


def _one_off(periodic: PeriodicTask, found: dict[str, Any], row: Row) -> dict[str, Any]:
    """Beat runs a one_off task once, at its next due time, then disables it: a one-off here,
    at that time (when it did run, at the time it ran: it is finished)."""
    now = timezone.now()
    if periodic.last_run_at is not None or periodic.total_run_count:
        run_at = periodic.last_run_at or now
    elif "cron" in found:
        after = max(now, periodic.start_time) if periodic.start_time else now
        run_at = timing.next_cron(found["cron"], found["timezone"], after=after)
    else:  # beat's first interval run is one interval after now, or at its start_time
        run_at = periodic.start_time or now + timedelta(seconds=found["interval_seconds"])
    row.notes.append("one_off: a one-off run at its next due time")
    return {"run_at": run_at, "timezone": found["timezone"]}


def _cron(periodic: PeriodicTask) -> str:
    c = periodic.crontab
    return " ".join([c.minute, c.hour, c.day_of_month, c.month_of_year, c.day_of_week])


def _zone_name(zone: Any) -> str:
    return getattr(zone, "key", None) or str(zone)


def _observes_dst(zone_name: str) -> bool:
    zone, year = ZoneInfo(zone_name), timezone.now().year
    return zone.utcoffset(datetime(year, 1, 1)) != zone.utcoffset(datetime(year, 7, 1))


def _interval_seconds(periodic: PeriodicTask) -> int:
    seconds = periodic.interval.every * SECONDS[periodic.interval.period]
    if seconds < 1 or seconds != int(seconds):
        raise NotConverted(
            f"an interval of {periodic.interval.every} {periodic.interval.period}: intervals "
            "here are whole seconds, at least 1"
        )
    return int(seconds)


def _data(periodic: PeriodicTask) -> dict[str, Any]:
    try:
        args = json.loads(periodic.args or "[]")
        kwargs = json.loads(periodic.kwargs or "{}")
    except json.JSONDecodeError as exc:
        raise NotConverted(f"its args or kwargs are not JSON ({exc.msg})") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise NotConverted("its args must be a JSON list and its kwargs a JSON object")
    return {"args": args, "kwargs": kwargs}


def _note_what_is_left(periodic: PeriodicTask, row: Row) -> None:
    if periodic.priority is not None:
        row.notes.append(
            f"priority {periodic.priority} not converted (its meaning is the broker's)"
        )
    if periodic.exchange or periodic.routing_key or periodic.headers not in (None, "", "{}"):
        row.notes.append("exchange, routing_key and headers not converted")
    if periodic.queue:
        row.notes.append(
            f"queue {periodic.queue!r}: named in the scheduler's id; the task runs on the "
            "worker's default Celery queue"
        )


# --- where it goes -----------------------------------------------------------------------------


def scheduler_id_for(task: str, queue: str | None) -> str:
    """`reports-proj-tasks-send` for task proj.tasks.send on queue reports: a scheduler id."""
    raw = f"{queue}-{task}" if queue else task
    slug = re.sub(r"[^a-z0-9_-]+", "-", raw.lower()).strip("-_") or "beat"
    if len(slug) > 64:
        digest = hashlib.sha1(raw.encode(), usedforsecurity=False).hexdigest()[:8]
        slug = f"{slug[:55].rstrip('-_')}-{digest}"
    return slug


def _scheduler_for(periodic: PeriodicTask) -> str:
    scheduler_id = scheduler_id_for(periodic.task, periodic.queue)
    handler = f"celery:{periodic.task}"
    scheduler = Scheduler.objects.filter(id=scheduler_id).first()
    if scheduler is None:
        task_services.scheduler_create(
            id=scheduler_id,
            kind=SchedulerKind.CELERY,
            handler=handler,
            description=f"Imported from django-celery-beat: {periodic.task}",
        )
    elif scheduler.kind != SchedulerKind.CELERY or scheduler.handler != handler:
        raise NotConverted(
            f"scheduler {scheduler_id!r} exists and runs {scheduler.handler or 'pull runners'}, "
            f"not {handler}"
        )
    return scheduler_id


def _save(
    scheduler_id: str, periodic: PeriodicTask, fields: dict[str, Any], *, paused: bool
) -> str:
    existing = Schedule.objects.filter(scheduler_id=scheduler_id, name=periodic.name).first()
    if existing is None:
        last_run = periodic.last_run_at
        if last_run is None and fields.get("run_at") and periodic.total_run_count:
            last_run = fields["run_at"]  # a one-off beat ran (and cleared, disabling it): done
        schedule = services.schedule_create(
            scheduler_id=scheduler_id,
            actor="import_beat",
            last_run_at=last_run,
            run_count=periodic.total_run_count,
            **fields,
        )
        outcome = CREATED
    else:
        changed = {k: v for k, v in fields.items() if getattr(existing, k) != v}
        schedule = existing
        if changed:
            schedule = services.schedule_update(
                schedule_id=existing.id, actor="import_beat", **changed
            )
        outcome = UPDATED if changed else UNCHANGED
    return _sync_status(schedule, enabled=periodic.enabled and not paused, outcome=outcome)


def _sync_status(schedule: Schedule, *, enabled: bool, outcome: str) -> str:
    if enabled and schedule.status == ScheduleStatus.PAUSED:
        services.schedule_resume(schedule_id=schedule.id, actor="import_beat")
    elif not enabled and schedule.status == ScheduleStatus.ACTIVE:
        services.schedule_pause(schedule_id=schedule.id, actor="import_beat")
    else:
        return outcome
    return UPDATED if outcome == UNCHANGED else outcome
