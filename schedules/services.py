"""Writes to schedules, and the orchestrator tick that turns due schedules into tasks."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from schedules import queries
from schedules.exceptions import ScheduleNotFound, ScheduleStateError
from schedules.models import Schedule, ScheduleEvent, ScheduleStatus
from schedules.policies import FALLBACK, allocate
from tasks import queue as task_queue
from tasks import services as task_services
from tasks.exceptions import DuplicateTask, SchedulerNotFound
from tasks.flowkeys import parse_rate
from tasks.models import Scheduler, Task, TaskStatus

logger = logging.getLogger(__name__)

ORCHESTRATOR = "orchestrator"
TIMING_FIELDS = {"cron", "interval_seconds", "run_at", "timezone", "start_at", "end_at"}


def _get(schedule_id: uuid.UUID) -> Schedule:
    try:
        return Schedule.objects.get(id=schedule_id)
    except Schedule.DoesNotExist:
        raise ScheduleNotFound(f"Schedule {schedule_id} does not exist.") from None


def record_events(
    changes: Sequence[tuple[uuid.UUID, str, str]], *, actor: str, note: str, at: datetime
) -> None:
    """ScheduleEvent rows for (schedule id, from, to) changes, in the caller's transaction."""
    ScheduleEvent.objects.bulk_create(
        ScheduleEvent(
            schedule_id=schedule_id,
            from_status=from_status,
            to_status=to_status,
            at=at,
            actor=actor[:200],
            note=note,
        )
        for schedule_id, from_status, to_status in changes
    )


def _set_status(
    schedule: Schedule, *, to_status: str, now: datetime, actor: str, note: str = ""
) -> Schedule:
    """Compare-and-swap the schedule's status, with its event; the deadline is recomputed
    from now."""
    if not schedule.can_transition_to(to_status):
        raise ScheduleStateError(
            f"Cannot move schedule {schedule.id} from {schedule.status} to {to_status}."
        )
    deadline = schedule.first_deadline(now=now) if to_status == ScheduleStatus.ACTIVE else None
    if to_status == ScheduleStatus.ACTIVE and deadline is None:
        to_status = ScheduleStatus.FINISHED  # nothing left to run (one-off done, past end_at)
        note = note or "nothing left to run"
    values: dict[str, Any] = {"status": to_status, "deadline_at": deadline, "modified_at": now}
    if to_status == ScheduleStatus.PAUSED:
        values["paused_reason"] = (note or f"paused by {actor or 'an operator'}")[:300]
    else:
        values["paused_reason"] = ""
    if to_status == ScheduleStatus.ACTIVE:
        # An operator's resume starts the failure count afresh (it may just have been fixed).
        values["consecutive_failures"] = 0
    with transaction.atomic():
        changed = Schedule.objects.filter(id=schedule.id, status=schedule.status).update(**values)
        if not changed:
            raise ScheduleStateError(f"Schedule {schedule.id} changed meanwhile; try again.")
        record_events([(schedule.id, schedule.status, to_status)], actor=actor, note=note, at=now)
    logger.info(
        "schedule %s %s -> %s by %s; next run %s",
        schedule.id,
        schedule.status,
        to_status,
        actor,
        deadline,
    )
    schedule.refresh_from_db()
    return schedule


@contextmanager
def _integrity_as_input(schedule: Schedule) -> Iterator[None]:
    """Integrity errors of a schedule's write as the caller's error. full_clean checked the
    hash and name, but a concurrent write may have taken one since (a unique index: checked
    at once, inside any caller's transaction). The scheduler is held by the write itself
    (queries.scheduler_held); its deferred foreign key is read here too, should the write's
    transaction be the outermost."""
    try:
        yield
    except IntegrityError as exc:
        field = queries.unique_conflict(exc)
        if field is not None:
            raise ValidationError(
                {field: f"Scheduler {schedule.scheduler_id!r} has a schedule with this {field}."}
            ) from None
        if queries.foreign_key_violated(exc):
            missing = f"Scheduler {schedule.scheduler_id!r} does not exist."
            raise SchedulerNotFound(missing) from None
        raise


def schedule_create(*, scheduler_id: str, actor: str = "", **fields: Any) -> Schedule:
    if not Scheduler.objects.filter(id=scheduler_id).exists():
        raise SchedulerNotFound(f"Scheduler {scheduler_id!r} does not exist.")
    now = timezone.now()
    schedule = Schedule(scheduler_id=scheduler_id, created_at=now, modified_at=now, **fields)
    schedule.full_clean()
    schedule.deadline_at = schedule.first_deadline(now=now)
    if schedule.deadline_at is None:
        schedule.status = ScheduleStatus.FINISHED
    with _integrity_as_input(schedule), transaction.atomic():
        if not queries.scheduler_held(scheduler_id):  # deleted since the check above
            raise SchedulerNotFound(f"Scheduler {scheduler_id!r} does not exist.")
        schedule.save(force_insert=True)
        record_events([(schedule.id, "", schedule.status)], actor=actor, note="created", at=now)
    logger.info("schedule %s created by %s; first run %s", schedule.id, actor, schedule.deadline_at)
    return schedule


def schedule_update(*, schedule_id: uuid.UUID, actor: str = "", **fields: Any) -> Schedule:
    """Edit; the deadline is recomputed from now (never fires at once unless due)."""
    now = timezone.now()
    with transaction.atomic():
        schedule = Schedule.objects.select_for_update().filter(id=schedule_id).first()
        if schedule is None:
            raise ScheduleNotFound(f"Schedule {schedule_id} does not exist.")
        for name, value in fields.items():
            setattr(schedule, name, value)
        schedule.full_clean()
        schedule.modified_at = now
        was = schedule.status
        if schedule.status != ScheduleStatus.PAUSED:
            schedule.deadline_at = schedule.first_deadline(now=now)
            finished = schedule.deadline_at is None
            schedule.status = ScheduleStatus.FINISHED if finished else ScheduleStatus.ACTIVE
        with _integrity_as_input(schedule), transaction.atomic():
            schedule.save(update_fields=[*fields, "modified_at", "deadline_at", "status"])
        if schedule.status != was:
            note = f"edited ({', '.join(fields)})"
            record_events([(schedule.id, was, schedule.status)], actor=actor, note=note, at=now)
    logger.info(
        "schedule %s edited by %s (%s); next run %s",
        schedule.id,
        actor,
        ", ".join(fields),
        schedule.deadline_at,
    )
    return schedule


def schedule_pause(*, schedule_id: uuid.UUID, actor: str = "") -> Schedule:
    schedule = _get(schedule_id)
    if schedule.status == ScheduleStatus.PAUSED:
        return schedule
    return _set_status(schedule, to_status=ScheduleStatus.PAUSED, now=timezone.now(), actor=actor)


def schedule_resume(*, schedule_id: uuid.UUID, actor: str = "") -> Schedule:
    schedule = _get(schedule_id)
    if schedule.status == ScheduleStatus.ACTIVE:
        return schedule
    return _set_status(schedule, to_status=ScheduleStatus.ACTIVE, now=timezone.now(), actor=actor)


def schedule_finish(*, schedule_id: uuid.UUID, actor: str = "") -> Schedule:
    """End a schedule for good (it makes no more tasks); resume brings it back if it still has
    occurrences."""
    schedule = _get(schedule_id)
    if schedule.status == ScheduleStatus.FINISHED:
        return schedule
    return _set_status(
        schedule,
        to_status=ScheduleStatus.FINISHED,
        now=timezone.now(),
        actor=actor,
        note="finished",
    )


def schedule_delete(*, schedule_id: uuid.UUID) -> None:
    """Its tasks stay (their `schedule` becomes null): history is not deleted with a template."""
    _get(schedule_id).delete()


def schedule_trigger(*, schedule_id: uuid.UUID, actor: str = "") -> Task:
    """Run now, out of turn: one task, unless one of the schedule is active (409)."""
    schedule = _get(schedule_id)
    now = timezone.now()
    try:
        with transaction.atomic():
            task = task_services.task_push(
                scheduler_id=schedule.scheduler_id,
                data=schedule.data,
                priority=schedule.priority,
                hash=schedule.task_hash,
                expires_at=_expiry(schedule, occurrence=now),
                actor=actor,
                extra={"schedule": schedule},
            )
            Schedule.objects.filter(id=schedule.id).update(
                last_run_at=now, run_count=F("run_count") + 1, modified_at=now
            )
    except DuplicateTask as exc:
        raise DuplicateTask(
            f"Schedule {schedule.id} already has an active task {exc.existing_id}.",
            existing_id=exc.existing_id,
        ) from None
    logger.info("schedule %s triggered by %s: task %s", schedule.id, actor, task.id)
    return task


# --- the orchestrator tick ---------------------------------------------------------------------


def orchestrate(*, scheduler_id: str | None = None, batch_size: int = 500) -> dict[str, int]:
    """Materialise due schedules into tasks, per scheduler, up to each queue's room.

    Safe with several runners at once: rows are taken with SKIP LOCKED and each deadline moves
    by compare-and-swap, so one occurrence yields at most one task.
    """
    now = timezone.now()
    due = queries.schedulers_with_due(now=now, scheduler_id=scheduler_id)
    created: dict[str, int] = {}
    for sid in due.values_list("id", flat=True):
        created[sid] = _orchestrate_scheduler(sid, now=now, batch_size=batch_size)
    return created


def _orchestrate_scheduler(scheduler_id: str, *, now: datetime, batch_size: int) -> int:
    created = 0
    while True:
        with transaction.atomic():
            scheduler, room = _room(scheduler_id, batch_size)
            if room <= 0:
                if scheduler is not None and not scheduler.paused:
                    logger.info("scheduler %s is full; due schedules wait", scheduler_id)
                return created
            picked = _pick(scheduler, room=room, now=now)
            made = _materialize(scheduler, picked, now=now) if picked else 0
        created += made
        if made:
            task_services.notify_queued(scheduler, count=made)
        if len(picked) < room:
            if created:
                logger.info("scheduler %s: %d tasks from due schedules", scheduler_id, created)
            return created


def _room(scheduler_id: str, batch_size: int) -> tuple[Scheduler | None, int]:
    scheduler = Scheduler.objects.filter(id=scheduler_id).first()
    if scheduler is None or scheduler.paused:
        return scheduler, 0
    rate = parse_rate(scheduler.rate_limit)
    if not scheduler.max_queue_size and rate is None:
        return scheduler, batch_size
    # Same lock as a bounded push, so tick and pushes together never pass the bound.
    scheduler = Scheduler.objects.select_for_update(no_key=True).get(id=scheduler_id)
    queued = Task.objects.filter(scheduler=scheduler, status=TaskStatus.QUEUED).count()
    bounds = [batch_size]
    if scheduler.max_queue_size:
        bounds.append(scheduler.max_queue_size - queued)
    if rate is not None:
        # A rate-limited queue gets at most one rate window of work ahead: more would only
        # wait in the queue and age (DESIGN §9.4, the orchestrator doesn't overfill it).
        bounds.append(rate.count - queued)
    return scheduler, min(bounds)


def _pick(scheduler: Scheduler, *, room: int, now: datetime) -> list[Schedule]:
    picked: list[Schedule] = []
    carry = 0
    shares = allocate(room, scheduler.policy_weights or {})
    for policy, share in shares:
        want = share + carry
        got = (
            queries.due_schedules(
                scheduler_id=scheduler.id,
                now=now,
                policy=policy,
                limit=want,
                exclude=[s.id for s in picked],
            )
            if want
            else []
        )
        picked += got
        carry = want - len(got)
    if carry and FALLBACK.name not in {policy.name for policy, _ in shares}:
        picked += queries.due_schedules(
            scheduler_id=scheduler.id,
            now=now,
            policy=FALLBACK,
            limit=carry,
            exclude=[s.id for s in picked],
        )
    return picked


def _materialize(scheduler: Scheduler, picked: Sequence[Schedule], *, now: datetime) -> int:
    plans = [(schedule, schedule.next_occurrence(after=now)) for schedule in picked]
    try:
        with transaction.atomic():
            return _advance_and_insert(scheduler, plans, now=now)
    except IntegrityError as exc:
        if task_queue.active_conflict(exc) is None:
            raise  # not a duplicate: a real error, not a schedule to wait
        # A task with a schedule's hash was pushed by hand meanwhile. Go one by one; the
        # blocked schedule stays due and waits for that task, as if it were its own.
        made = 0
        for plan in plans:
            try:
                with transaction.atomic():
                    made += _advance_and_insert(scheduler, [plan], now=now)
            except IntegrityError as exc:
                if task_queue.active_conflict(exc) is None:
                    raise
                logger.info("schedule %s waits: an active task holds its hash", plan[0].id)
        return made


def _advance_and_insert(
    scheduler: Scheduler, plans: Sequence[tuple[Schedule, datetime | None]], *, now: datetime
) -> int:
    moved = queries.advance(plans=plans, now=now)
    finished = [
        (s.id, ScheduleStatus.ACTIVE, ScheduleStatus.FINISHED)
        for s, at in plans
        if at is None and s.id in moved
    ]
    record_events(finished, actor=ORCHESTRATOR, note="no occurrence left", at=now)
    tasks = [
        Task(
            id=uuid.uuid4(),
            scheduler=scheduler,
            schedule=schedule,
            data=schedule.data,
            priority=schedule.priority,
            hash=schedule.task_hash,
            not_before=now,
            expires_at=_expiry(schedule, occurrence=schedule.deadline_at or now),
            created_at=now,
            modified_at=now,
        )
        for schedule, _ in plans
        if schedule.id in moved
    ]
    task_queue.insert_queued(
        tasks, actor=ORCHESTRATOR, note="materialised from its schedule", at=now
    )
    return len(tasks)


def _expiry(schedule: Schedule, *, occurrence: datetime) -> datetime | None:
    """When a task of `schedule` made for `occurrence` expires: `expire_seconds` after the
    occurrence it runs for (after downtime the missed occurrences coalesce into the oldest,
    so its task may expire at once: the outage's run is skipped, the next one is on time)."""
    if not schedule.expire_seconds:
        return None
    return occurrence + timedelta(seconds=schedule.expire_seconds)


# --- adaptive intervals ------------------------------------------------------------------------


def adapt_interval(task: Task) -> None:
    """After a completed task: `{"changed": false}` grows the interval by backoff_factor up to
    max_interval_seconds; `{"changed": true}` shrinks it by the factor down to
    min_interval_seconds. The next run moves to last run + new interval (now if that passed)."""
    if task.schedule_id is None or not isinstance(task.result, dict):
        return
    changed = task.result.get("changed")
    if not isinstance(changed, bool):
        return
    schedule = Schedule.objects.filter(id=task.schedule_id, backoff_factor__isnull=False).first()
    if schedule is None or not schedule.interval_seconds:
        return
    factor = schedule.backoff_factor
    if changed:
        interval = max(
            schedule.min_interval_seconds, math.floor(schedule.interval_seconds / factor)
        )
    else:
        interval = min(schedule.max_interval_seconds, math.ceil(schedule.interval_seconds * factor))
    if interval == schedule.interval_seconds:
        return
    values: dict[str, Any] = {"interval_seconds": interval}
    if schedule.status == ScheduleStatus.ACTIVE and schedule.last_run_at:
        values["deadline_at"] = max(
            schedule.last_run_at + timedelta(seconds=interval), timezone.now()
        )
    Schedule.objects.filter(id=schedule.id, interval_seconds=schedule.interval_seconds).update(
        **values
    )
    logger.info(
        "schedule %s: interval %ss -> %ss (result changed=%s)",
        schedule.id,
        schedule.interval_seconds,
        interval,
        changed,
    )


# --- failure cooldown and auto-pause (DESIGN 9.4) ----------------------------------------------

FAILURE_POLICY = "failure policy"


def schedule_task_failed(task: Task) -> None:
    """A task of a schedule ended FAILED or DEAD (a hook run in that transaction): count the
    failure; after `max_consecutive_failures` in a row pause the schedule with its reason,
    else with `failure_backoff_factor` push its next deadline out (a cooldown)."""
    if task.schedule_id is None:
        return
    now = timezone.now()
    # NO KEY UPDATE: a concurrent insert of a task of this schedule holds KEY SHARE on it
    # (its foreign key) while it waits on this very task's unique-index entry.
    schedule = Schedule.objects.select_for_update(no_key=True).filter(id=task.schedule_id).first()
    if schedule is None:
        return
    failures = schedule.consecutive_failures + 1
    values, event = _failure_policy(schedule, task, failures=failures, now=now)
    Schedule.objects.filter(id=schedule.id).update(
        consecutive_failures=failures, modified_at=now, **values
    )
    if event is not None:
        to_status, note = event
        record_events(
            [(schedule.id, schedule.status, to_status)], actor=FAILURE_POLICY, note=note, at=now
        )
        logger.info("schedule %s: %s", schedule.id, note)


def _failure_policy(
    schedule: Schedule, task: Task, *, failures: int, now: datetime
) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """What the failure policy changes on an active schedule after its `failures`-th failed
    run in a row (the fields, and the event's status and note), or nothing."""
    limit = schedule.max_consecutive_failures
    if schedule.status != ScheduleStatus.ACTIVE:
        return {}, None
    if limit and failures >= limit:
        reason = (
            f"{failures} failed run{'s' if failures > 1 else ''} in a row "
            f"(max_consecutive_failures is {limit}); last: "
            f"task {task.id} {task.status}: {task.error or 'no error text'}"
        )[:300]
        paused = {"status": ScheduleStatus.PAUSED, "deadline_at": None, "paused_reason": reason}
        return paused, (ScheduleStatus.PAUSED, reason)
    if not schedule.failure_backoff_factor:
        return {}, None
    deadline = cooldown_deadline(schedule, failures=failures, now=now)
    if deadline is None or (schedule.deadline_at is not None and deadline <= schedule.deadline_at):
        return {}, None
    note = f"failed run {failures} in a row: cooldown until {deadline.isoformat()}"
    return {"deadline_at": deadline}, (ScheduleStatus.ACTIVE, note)


def cooldown_deadline(schedule: Schedule, *, failures: int, now: datetime) -> datetime | None:
    """The next run after `failures` failed runs in a row: the last run + its interval *
    factor^failures, capped at failure_backoff_max_seconds; a cron schedule runs at its first
    occurrence from then on. None when it has no occurrence left (or is a one-off)."""
    last_run = schedule.last_run_at or now
    if schedule.interval_seconds:
        interval = float(schedule.interval_seconds)
    elif schedule.cron:
        following = schedule.next_occurrence(after=last_run)
        if following is None:
            return None
        interval = (following - last_run).total_seconds()
    else:
        return None
    factor = schedule.failure_backoff_factor or 1.0
    # min() before the power would overflow: factor^failures grows without bound.
    exponent = min(failures, 64)
    delay = min(interval * factor**exponent, float(schedule.failure_backoff_max_seconds))
    target = last_run + timedelta(seconds=delay)
    if schedule.cron:
        return schedule.next_occurrence(after=target - timedelta(microseconds=1))
    if schedule.end_at and target > schedule.end_at:
        return None
    return target


def schedule_task_succeeded(task: Task) -> None:
    """A task of a schedule COMPLETED (on commit): its failure count starts again from 0."""
    if task.schedule_id is None:
        return
    Schedule.objects.filter(id=task.schedule_id, consecutive_failures__gt=0).update(
        consecutive_failures=0
    )
