from __future__ import annotations

import argparse
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import CommandError, CommandParser

from tasks import housekeeping, selectors, services
from tasks.exceptions import QueueError
from tasks.management.commands._base import SubcommandCommand, dumps, parse_json_object
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tasks.serializers import (
    PopSerializer,
    TaskEventSerializer,
    TaskPushSerializer,
    TaskSerializer,
)


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a task id (UUID)") from None


def _expiry(raw: str | None) -> datetime | None:
    """--expires-at, checked as the API checks `expires_at` (aware, in the future)."""
    if raw is None:
        return None
    body = TaskPushSerializer(data={"expires_at": raw})
    if not body.is_valid():
        raise CommandError(f"--expires-at: {' '.join(body.errors['expires_at'])}")
    return body.validated_data["expires_at"]


class Command(SubcommandCommand):
    help = (
        "Operate on tasks: push, pop, list, show, events, cancel, requeue, reap expired leases, "
        "prune old finished tasks, hourly stats. `manage.py task <action> --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        push = sub.add_parser("push", help="Queue a task (like POST /api/schedulers/{id}/push/).")
        push.add_argument("--scheduler", required=True)
        push.add_argument("--data", help="JSON object, the task's payload.")
        push.add_argument("--priority", type=int, default=0, help="Lower runs first.")
        push.add_argument("--hash", help="Dedup key: at most one active task per hash.")
        push.add_argument(
            "--expires-at",
            help="ISO 8601 with its offset (2026-12-01T18:00:00Z): not handed out by then, the "
            "task never runs and ends EXPIRED.",
        )
        pop = sub.add_parser("pop", help="Lease due tasks (DISPATCHED) and print them as JSON.")
        pop.add_argument("--scheduler", required=True)
        pop.add_argument("--limit", type=int, default=1)
        pop.add_argument("--filters", help='JSON object on data keys, e.g. {"org": "acme"}.')
        pop.add_argument("--worker", default="cli")
        lst = sub.add_parser("list", help="List tasks, newest first.")
        lst.add_argument("--scheduler")
        lst.add_argument("--status", choices=TaskStatus.values, help="DEAD lists dead letters.")
        lst.add_argument("--hash")
        lst.add_argument("--limit", type=int, default=50)
        for name, text in [
            ("show", "Print one task as JSON."),
            ("events", "Print a task's transition history."),
            ("cancel", "Cancel a task (a RUNNING one is asked to stop)."),
        ]:
            sub.add_parser(name, help=text).add_argument("task_id", type=_uuid)
        requeue = sub.add_parser(
            "requeue", help="Requeue FAILED, DEAD, CANCELLED or EXPIRED tasks."
        )
        requeue.add_argument("task_ids", type=_uuid, nargs="*")
        requeue.add_argument("--all-dead", metavar="SCHEDULER", help="Every DEAD task of a queue.")
        sub.add_parser(
            "reap",
            help="Turn expired leases into failed attempts (retry policy), and QUEUED tasks past "
            "their expires_at into EXPIRED.",
        )
        prune = sub.add_parser("prune", help="Delete finished tasks past their retention.")
        prune.add_argument("--days", type=int, help="Retention of COMPLETED/FAILED/CANCELLED.")
        prune.add_argument("--dead-days", type=int, help="Retention of DEAD tasks.")
        stats = sub.add_parser("stats", help="Transitions per hour, per scheduler and status.")
        stats.add_argument("--scheduler")
        stats.add_argument("--hours", type=int, default=24)

    def _push(
        self,
        *,
        scheduler: str,
        data: str | None,
        priority: int,
        hash: str | None,
        expires_at: str | None = None,
        **_: Any,
    ) -> None:
        task = services.task_push(
            scheduler_id=scheduler,
            data=parse_json_object(data, option="--data"),
            priority=priority,
            hash=hash,
            expires_at=_expiry(expires_at),
            actor="cli",
        )
        self.stdout.write(dumps(TaskSerializer(task).data))

    def _pop(
        self, *, scheduler: str, limit: int, filters: str | None, worker: str, **_: Any
    ) -> None:
        body = PopSerializer(
            data={"limit": limit, "filters": parse_json_object(filters, option="--filters")}
        )
        if not body.is_valid():
            raise CommandError(dumps(body.errors))
        tasks = services.task_pop(scheduler_id=scheduler, worker=worker, **body.validated_data)
        self.stdout.write(dumps(TaskSerializer(tasks, many=True).data))

    def _list(
        self, *, scheduler: str | None, status: str | None, hash: str | None, limit: int, **_: Any
    ) -> None:
        queryset = selectors.task_list().order_by("-created_at", "-id")
        for field, value in [("scheduler_id", scheduler), ("status", status), ("hash", hash)]:
            if value:
                queryset = queryset.filter(**{field: value})
        self.stdout.write(
            f"{'id':36}  {'scheduler':20} {'status':10} {'prio':>5} {'att':>3}  created_at"
        )
        for task in queryset[: max(limit, 1)]:
            self.stdout.write(
                f"{task.id}  {task.scheduler_id:20} {task.status:10} {task.priority:5} "
                f"{task.attempts:3}  {task.created_at:%Y-%m-%d %H:%M:%S}"
            )

    def _show(self, *, task_id: uuid.UUID, **_: Any) -> None:
        task = Task.objects.filter(id=task_id).first()
        if task is None:
            raise CommandError(f"Task {task_id} does not exist.")
        self.stdout.write(dumps(TaskSerializer(task).data))

    def _events(self, *, task_id: uuid.UUID, **_: Any) -> None:
        if not Task.objects.filter(id=task_id).exists():
            raise CommandError(f"Task {task_id} does not exist.")
        events = TaskEvent.objects.filter(task_id=task_id).order_by("at", "id")
        self.stdout.write(dumps(TaskEventSerializer(events, many=True).data))

    def _cancel(self, *, task_id: uuid.UUID, **_: Any) -> None:
        task = services.task_cancel(task_id=task_id, actor="cli")
        state = "cancel requested (running)" if task.status == TaskStatus.RUNNING else task.status
        self.stdout.write(f"{task.id}: {state}")

    def _dead_of(self, scheduler_id: str) -> list[uuid.UUID]:
        """The DEAD tasks of a queue. An unknown queue is an error (likely a typo); a queue
        with none is not: replaying its dead letters has nothing to do, which is success."""
        if not Scheduler.objects.filter(id=scheduler_id).exists():
            raise CommandError(f"Scheduler {scheduler_id!r} does not exist.")
        dead = Task.objects.filter(scheduler_id=scheduler_id, status=TaskStatus.DEAD)
        ids = list(dead.values_list("id", flat=True))
        if not ids:
            self.stdout.write(f"no DEAD tasks in {scheduler_id}")
        return ids

    def _requeue(self, *, task_ids: list[uuid.UUID], all_dead: str | None, **_: Any) -> None:
        if not task_ids and not all_dead:
            raise CommandError("Name task ids or --all-dead SCHEDULER.")
        dead = self._dead_of(all_dead) if all_dead else []  # checked before anything is done
        ids = [*task_ids, *dead]
        failures = 0
        for task_id in ids:
            try:
                services.task_requeue(task_id=task_id, actor="cli")
                self.stdout.write(f"{task_id}: QUEUED")
            except QueueError as exc:
                failures += 1
                self.stderr.write(f"{task_id}: refused: {exc.message}")
        if failures:
            raise CommandError(f"{failures} of {len(ids)} tasks were not requeued.")

    def _reap(self, **_: Any) -> None:
        self.stdout.write(f"reaped {housekeeping.tasks_reap_expired(actor='cli')} expired leases")
        self.stdout.write(f"expired {housekeeping.tasks_expire_due(actor='cli')} queued tasks")

    def _prune(self, *, days: int | None, dead_days: int | None, **_: Any) -> None:
        deleted = housekeeping.tasks_prune(
            older_than=timedelta(days=days) if days else None,
            dead_older_than=timedelta(days=dead_days) if dead_days else None,
        )
        self.stdout.write(f"pruned {deleted} finished tasks")

    def _stats(self, *, scheduler: str | None, hours: int, **_: Any) -> None:
        for row in selectors.hourly_stats(scheduler_id=scheduler, hours=max(hours, 1)):
            self.stdout.write(
                f"{row['hour']:%Y-%m-%d %H:00}  {row['scheduler']:20} "
                f"{row['status']:10} {row['count']}"
            )
