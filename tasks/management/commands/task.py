from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.core.management.base import CommandError, CommandParser

from tasks import housekeeping, selectors, services
from tasks.exceptions import QueueError
from tasks.management.commands._base import (
    SubcommandCommand,
    fields_table,
    parse_json_object,
    table,
)
from tasks.management.commands._fields import (
    add_field_options,
    describe_errors,
    field_values,
    validated,
    writable,
)
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus
from tasks.references import find_task
from tasks.serializers import (
    PoppedTaskSerializer,
    PopSerializer,
    TaskEventSerializer,
    TaskPushSerializer,
    TaskSerializer,
)

TASK_REF = "The task's id, or a unique prefix of it (4+ hex digits)."
LIST_COLUMNS = ["id", "scheduler", "status", "prio", "att", "created_at", "error"]


def _as_json(task: Task) -> dict[str, Any]:
    # The operator's view, as GET /api/tasks/{id}/ gives it to an operator.
    return TaskSerializer(task, context={"show_lease_token": True}).data


class Command(SubcommandCommand):
    help = (
        "Operate on tasks: push, pop, list, show, events, cancel, requeue, release, reap "
        "expired leases, prune old finished tasks, hourly stats. A task is named by its id or a "
        "unique prefix of it. `manage.py task ACTION --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = self.subcommands(parser)
        self._push_parser(sub)
        self._pop_parser(sub)
        self._list_parser(sub)
        for name, text in [
            ("show", "One task: every field, the error and its traceback."),
            ("events", "A task's transition history, oldest first."),
            ("cancel", "Cancel a task (a RUNNING one is asked to stop)."),
            ("release", "Hand a DISPATCHED or RUNNING task back to the queue (attempt not spent)."),
        ]:
            self.action(sub, name, text).add_argument("task", metavar="TASK", help=TASK_REF)
        requeue = self.action(sub, "requeue", "Requeue FAILED, DEAD or CANCELLED tasks.")
        requeue.add_argument("tasks", nargs="*", metavar="TASK", help=TASK_REF)
        requeue.add_argument(
            "--all-dead", metavar="SCHEDULER", help="Every DEAD task of this queue."
        )
        self.action(sub, "reap", "Turn expired leases into failed attempts (retry policy).")
        self._prune_parser(sub)
        stats = self.action(sub, "stats", "Transitions per hour, per scheduler and status.")
        stats.add_argument("--scheduler", metavar="ID", help="Only this queue's.")
        stats.add_argument("--hours", type=int, default=24, metavar="N", help="Hours back.")

    def _list_parser(self, sub: Any) -> None:
        lst = self.action(sub, "list", "Tasks, newest first.")
        lst.add_argument("--scheduler", metavar="ID", help="Only this queue's.")
        lst.add_argument("--status", choices=TaskStatus.values, help="DEAD lists dead letters.")
        lst.add_argument("--hash", help="Only tasks with this dedup key.")
        lst.add_argument(
            "--schedule", type=uuid.UUID, metavar="ID", help="Only the tasks this schedule made."
        )
        lst.add_argument("--limit", type=int, default=50, metavar="N", help="At most N rows.")

    def _prune_parser(self, sub: Any) -> None:
        prune = self.action(sub, "prune", "Delete finished tasks past their retention.")
        prune.add_argument(
            "--days",
            type=int,
            metavar="N",
            help="Retention of COMPLETED/FAILED/CANCELLED "
            "(default: the TASK_RETENTION_DAYS setting).",
        )
        prune.add_argument(
            "--dead-days",
            type=int,
            metavar="N",
            help="Retention of DEAD tasks (default: the TASK_DEAD_RETENTION_DAYS setting).",
        )

    def _push_parser(self, sub: Any) -> None:
        push = self.action(sub, "push", "Queue a task (as POST /api/schedulers/{id}/push/).")
        push.add_argument("--scheduler", required=True, metavar="ID", help="The queue.")
        add_field_options(push, TaskPushSerializer, writable(TaskPushSerializer), updating=False)

    def _pop_parser(self, sub: Any) -> None:
        pop = self.action(sub, "pop", "Lease due tasks (now DISPATCHED), with their lease tokens.")
        pop.add_argument("--scheduler", required=True, metavar="ID", help="The queue.")
        pop.add_argument("--limit", type=int, default=1, metavar="N", help="At most N tasks.")
        pop.add_argument(
            "--filters", metavar="JSON", help='Match on data keys, e.g. {"org": "acme"}.'
        )
        pop.add_argument("--worker", default="cli", help="Recorded as the tasks' holder.")

    def _push(self, *, scheduler: str, **options: Any) -> None:
        body = field_values(options, TaskPushSerializer, writable(TaskPushSerializer))
        fields = validated(TaskPushSerializer, body)
        task = services.task_push(scheduler_id=scheduler, actor="cli", **fields)
        self.result(_as_json(task), lambda: fields_table(_as_json(task)))

    def _pop(
        self, *, scheduler: str, limit: int, filters: str | None, worker: str, **_: Any
    ) -> None:
        body = PopSerializer(
            data={"limit": limit, "filters": parse_json_object(filters, option="--filters")}
        )
        if not body.is_valid():
            raise CommandError(f"invalid: {describe_errors(body.errors)}")
        tasks = services.task_pop(scheduler_id=scheduler, worker=worker, **body.validated_data)
        rows = PoppedTaskSerializer(tasks, many=True).data
        columns = ["id", "status", "priority", "lease_expires_at", "lease_token", "data"]
        self.result(rows, lambda: table(columns, ([r[c] for c in columns] for r in rows)))

    def _list(self, *, limit: int, **options: Any) -> None:
        queryset = selectors.task_list().order_by("-created_at", "-id")
        for field, value in [
            ("scheduler_id", options["scheduler"]),
            ("status", options["status"]),
            ("hash", options["hash"]),
            ("schedule_id", options["schedule"]),
        ]:
            if value:
                queryset = queryset.filter(**{field: value})
        tasks = list(queryset[: max(limit, 1)])
        self.result([_as_json(task) for task in tasks], lambda: _task_table(tasks))

    def _show(self, *, task: str, **_: Any) -> None:
        record = _as_json(find_task(task))
        self.result(record, lambda: fields_table(record))

    def _events(self, *, task: str, **_: Any) -> None:
        found = find_task(task)
        events = TaskEvent.objects.filter(task_id=found.id).order_by("at", "id")
        rows = TaskEventSerializer(events, many=True).data
        columns = ["at", "from_status", "to_status", "actor", "note"]
        self.result(
            rows,
            lambda: table(
                columns, ([row.get(c) for c in columns] for row in rows), title=str(found.id)
            ),
        )

    def _cancel(self, *, task: str, **_: Any) -> None:
        done = services.task_cancel(task_id=find_task(task).id, actor="cli")
        state = "cancel requested (running)" if done.status == TaskStatus.RUNNING else done.status
        self.result(_as_json(done), f"{done.id}: {state}")

    def _release(self, *, task: str, **_: Any) -> None:
        done = services.task_hand_back(
            task_id=find_task(task).id, reason="released by an operator (cli)", actor="cli"
        )
        self.result(_as_json(done), f"{done.id}: {done.status}")

    def _dead_of(self, scheduler_id: str) -> list[Task]:
        """The DEAD tasks of a queue. An unknown queue is an error (likely a typo); a queue
        with none is not: replaying its dead letters has nothing to do, which is success."""
        if not Scheduler.objects.filter(id=scheduler_id).exists():
            raise CommandError(f"Scheduler {scheduler_id!r} does not exist.")
        dead = list(Task.objects.filter(scheduler_id=scheduler_id, status=TaskStatus.DEAD))
        if not dead:
            self.note(f"no DEAD tasks in {scheduler_id}")
        return dead

    def _requeue(self, *, tasks: list[str], all_dead: str | None, **_: Any) -> None:
        if not tasks and not all_dead:
            raise CommandError("Name tasks (ids or prefixes) or --all-dead SCHEDULER.")
        named = [find_task(ref) for ref in tasks]  # every reference checked before any change
        todo = [*named, *(self._dead_of(all_dead) if all_dead else [])]
        done, refused = [], []
        for task in todo:
            try:
                done.append(services.task_requeue(task_id=task.id, actor="cli"))
            except QueueError as exc:
                refused.append({"id": str(task.id), "detail": exc.message})
                self.note(f"{task.id}: refused: {exc.message}")
        self.result(
            {"requeued": [str(t.id) for t in done], "refused": refused},
            "\n".join(f"{t.id}: QUEUED" for t in done) if done else "nothing requeued",
        )
        if refused:
            raise CommandError(f"{len(refused)} of {len(todo)} tasks were not requeued.")

    def _reap(self, **_: Any) -> None:
        reaped = housekeeping.tasks_reap_expired(actor="cli")
        self.result({"reaped": reaped}, f"reaped {reaped} expired leases")

    def _prune(self, *, days: int | None, dead_days: int | None, **_: Any) -> None:
        deleted = housekeeping.tasks_prune(
            older_than=timedelta(days=days) if days else None,
            dead_older_than=timedelta(days=dead_days) if dead_days else None,
        )
        self.result({"pruned": deleted}, f"pruned {deleted} finished tasks")

    def _stats(self, *, scheduler: str | None, hours: int, **_: Any) -> None:
        rows = selectors.hourly_stats(scheduler_id=scheduler, hours=max(hours, 1))
        columns = ["hour", "scheduler", "status", "count"]
        self.result(
            rows,
            lambda: table(
                columns,
                (
                    [f"{r['hour']:%Y-%m-%d %H:00}", r["scheduler"], r["status"], r["count"]]
                    for r in rows
                ),
            ),
        )


def _task_table(tasks: list[Task]) -> Any:
    return table(
        LIST_COLUMNS,
        (
            [
                task.id,
                task.scheduler_id,
                task.status,
                task.priority,
                task.attempts,
                f"{task.created_at:%Y-%m-%d %H:%M:%S}",
                task.error[:60],
            ]
            for task in tasks
        ),
    )
