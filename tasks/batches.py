"""The batch forms of push and report (DESIGN §9.3): up to 1,000 items a request, one outcome
per item, in order. A batch push is one transaction with exactly the guarantees of single
pushes (dedup by the partial unique index, the queue bound under the scheduler's row lock); a
batch report applies each report on its own, as its runner would one by one."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from scheduler_site import tracing
from tasks import queue
from tasks.exceptions import InvalidRequest, QueueError, TaskNotFound
from tasks.leases import LeaseProof
from tasks.models import LEASED_STATUSES, Scheduler, Task, TaskStatus
from tasks.registry import check_task_data
from tasks.reports import task_report
from tasks.transitions import get_scheduler, notify_queued

BATCH_MAX = 1000
_ACTIVE = [TaskStatus.QUEUED, *LEASED_STATUSES]


@dataclass
class PushOutcome:
    status: int  # 201 created, 409 an active task has the hash, 429 full, 400 bad data
    task: Task | None = None
    existing_id: uuid.UUID | None = None
    errors: dict[str, Any] | None = None


def task_push_many(
    *, scheduler_id: str, pushes: Sequence[Mapping[str, Any]], actor: str = ""
) -> list[PushOutcome]:
    """Queue each of `pushes` (validated push fields: data, priority, hash, not_before,
    expires_at) in one
    transaction. A hash already active, or given twice in the batch, is a 409 naming the task
    that has it; once a bounded queue is full, the rest are 429s."""
    now = timezone.now()
    with transaction.atomic():
        scheduler = get_scheduler(scheduler_id)
        if scheduler.max_queue_size:
            # The lock of single bounded pushes: pushes and ticks together never pass it.
            scheduler = get_scheduler(scheduler_id, for_update=True)
        outcomes = _plan(scheduler, pushes, now=now)
        planned = [o.task for o in outcomes if o.status == 201 and o.task is not None]
        note = tracing.noted("pushed", tracing.current_traceparent())
        created = queue.insert_queued_new(planned, actor=actor, note=note, at=now)
        _settle_conflicts(scheduler, outcomes, created)
        if created:
            notify_queued(scheduler, count=len(created))
    return outcomes


def _plan(
    scheduler: Scheduler, pushes: Sequence[Mapping[str, Any]], *, now: Any
) -> list[PushOutcome]:
    hashes = {push["hash"] for push in pushes if push.get("hash")}
    held = dict(
        Task.objects.filter(scheduler=scheduler, hash__in=hashes, status__in=_ACTIVE).values_list(
            "hash", "id"
        )
    )
    room = _room(scheduler)
    outcomes: list[PushOutcome] = []
    for push in pushes:
        task_hash = push.get("hash") or None
        if problem := _data_problem(scheduler, push.get("data") or {}):
            outcomes.append(PushOutcome(400, errors=problem))
        elif task_hash in held:
            outcomes.append(PushOutcome(409, existing_id=held[task_hash]))
        elif room is not None and room <= 0:
            outcomes.append(PushOutcome(429))
        else:
            task = _task(scheduler, push, now=now)
            if task_hash:
                held[task_hash] = task.id  # a second one in this batch names this one
            room = None if room is None else room - 1
            outcomes.append(PushOutcome(201, task=task))
    return outcomes


def _data_problem(scheduler: Scheduler, data: dict[str, Any]) -> dict[str, Any] | None:
    """What the queue's handler says of the data (a `celery:` task's arguments), as a single
    push would refuse it; None when it can run."""
    try:
        check_task_data(scheduler, data)
    except InvalidRequest as exc:
        return exc.payload()
    return None


def _room(scheduler: Scheduler) -> int | None:
    if not scheduler.max_queue_size:
        return None
    queued = Task.objects.filter(scheduler=scheduler, status=TaskStatus.QUEUED).count()
    return scheduler.max_queue_size - queued


def _task(scheduler: Scheduler, push: Mapping[str, Any], *, now: Any) -> Task:
    return Task(
        id=uuid.uuid4(),
        scheduler=scheduler,
        data=push.get("data") or {},
        priority=push.get("priority", 0),
        hash=push.get("hash") or None,
        not_before=push.get("not_before") or now,
        expires_at=push.get("expires_at"),
        created_at=now,
        modified_at=now,
        trace_context=tracing.current_traceparent(),
    )


def _settle_conflicts(
    scheduler: Scheduler, outcomes: list[PushOutcome], created: Collection[uuid.UUID]
) -> None:
    """A planned task a concurrent push beat to its hash was not inserted: a 409 naming the
    winner (the same as a single push that loses that race)."""
    lost = [o for o in outcomes if o.status == 201 and o.task and o.task.id not in created]
    if not lost:
        return
    winners = dict(
        Task.objects.filter(
            scheduler=scheduler, hash__in=[o.task.hash for o in lost if o.task], status__in=_ACTIVE
        ).values_list("hash", "id")
    )
    for outcome in lost:
        assert outcome.task is not None
        outcome.existing_id = winners.get(outcome.task.hash)
        outcome.status, outcome.task = 409, None


@dataclass
class ReportOutcome:
    id: uuid.UUID
    status: int  # 200 applied, 404 no such task (or not the caller's), 409 refused
    task: Task | None = None
    detail: str = ""


def tasks_report_many(
    *,
    reports: Sequence[Mapping[str, Any]],
    actor: str = "",
    operator: bool = False,
    queues: Collection[str] | None = None,
) -> list[ReportOutcome]:
    """Apply each report (id, lease_token, status, result, error) as its own PATCH would: an
    outcome per report, in order. `queues` limits a runner to its queues: a task of another
    answers 404, as a single report's would."""
    visible = _visible_ids([report["id"] for report in reports], queues)
    outcomes = []
    for report in reports:
        outcomes.append(_report_one(report, actor=actor, operator=operator, visible=visible))
    return outcomes


def _visible_ids(ids: Sequence[uuid.UUID], queues: Collection[str] | None) -> set[uuid.UUID]:
    tasks = Task.objects.filter(id__in=ids)
    if queues is not None:
        tasks = tasks.filter(scheduler_id__in=list(queues))
    return set(tasks.values_list("id", flat=True))


def _report_one(
    report: Mapping[str, Any], *, actor: str, operator: bool, visible: set[uuid.UUID]
) -> ReportOutcome:
    task_id = report["id"]
    if task_id not in visible:
        return ReportOutcome(task_id, 404, detail=f"Task {task_id} does not exist.")
    proof = LeaseProof(token=report.get("lease_token"), operator=operator)
    try:
        task = task_report(
            task_id=task_id,
            status=report["status"],
            result=report.get("result"),
            error=report.get("error", ""),
            traceback=report.get("traceback", ""),
            actor=actor,
            attempt=report.get("attempt"),
            proof=proof,
        )
    except TaskNotFound as exc:
        return ReportOutcome(task_id, 404, detail=exc.message)
    except QueueError as exc:
        return ReportOutcome(task_id, exc.http_status, detail=exc.message)
    return ReportOutcome(task_id, 200, task=task)
