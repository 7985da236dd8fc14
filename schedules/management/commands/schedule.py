from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser
from django.utils import timezone

from schedules import services
from schedules.models import Schedule, ScheduleStatus
from schedules.selectors import resolve_schedule
from schedules.serializers import ScheduleSerializer, ScheduleUpdateSerializer
from tasks.management.commands._base import SubcommandCommand, fields_table, table
from tasks.management.commands._fields import (
    add_field_options,
    field_values,
    require_some,
    validated,
    writable,
)

SCHEDULE_REF = "The schedule's id, name or hash, or a unique prefix of its id."
WHICH_SCHEDULER = "The schedule's queue, when a name or hash is used in several."
LIST_COLUMNS = ["id", "scheduler", "name", "status", "when", "next run (UTC)", "runs"]


def _when(s: dict[str, Any]) -> str:
    if s["cron"]:
        return f"{s['cron']} ({s['timezone']})"
    return f"every {s['interval_seconds']}s" if s["interval_seconds"] else f"once {s['run_at']}"


def _label(schedule: Schedule) -> str:
    name = f" ({schedule.scheduler_id}/{schedule.name})" if schedule.name else ""
    return f"{schedule.id}{name}"


def _summary(s: dict[str, Any], verb: str) -> str:
    label = f"{s['id']} ({s['scheduler']}/{s['name']})" if s["name"] else s["id"]
    words = f"; {s['cron_description']}" if s["cron_description"] else ""
    return f"{verb} {label}: {s['status']}, next run {s['deadline_at'] or '-'}{words}"


class Command(SubcommandCommand):
    help = (
        "Operate on schedules: list, show, create, update, pause, resume, trigger (run now), "
        "delete. A schedule is named by its id, its name, its hash or a unique prefix of its id "
        "(--scheduler says which queue's when several have that name or hash). Options of "
        "create and update are the API's fields. `manage.py schedule ACTION --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = self.subcommands(parser)
        lst = self.action(sub, "list", "Schedules with status, next and last run, soonest first.")
        lst.add_argument("--scheduler", metavar="ID", help="Only this queue's.")
        lst.add_argument("--status", choices=ScheduleStatus.values, help="Only in this status.")
        lst.add_argument("--due", action="store_true", help="Only those due now.")
        lst.add_argument("--limit", type=int, default=50, metavar="N", help="At most N rows.")
        create = self.action(
            sub, "create", "Create a schedule: one of --cron, --interval-seconds, --run-at."
        )
        add_field_options(create, ScheduleSerializer, writable(ScheduleSerializer), updating=False)
        update = self._with_ref(
            sub, "update", "Change a schedule; its next run is recomputed from now."
        )
        names = writable(ScheduleUpdateSerializer)
        add_field_options(update, ScheduleUpdateSerializer, names, updating=True)
        for name, text in [
            ("show", "One schedule: every field, the cron expression in words."),
            ("pause", "Pause: no tasks until resumed."),
            ("resume", "Resume: next run recomputed from now (no burst of missed runs)."),
            ("trigger", "Run now, out of turn (refused while a task of it is active)."),
            ("delete", "Delete the schedule (its tasks stay)."),
        ]:
            self._with_ref(sub, name, text)

    def _with_ref(self, sub: Any, name: str, text: str) -> CommandParser:
        cmd = self.action(sub, name, text)
        cmd.add_argument("schedule", metavar="SCHEDULE", help=SCHEDULE_REF)
        cmd.add_argument("--scheduler", metavar="ID", help=WHICH_SCHEDULER)
        return cmd

    def _list(
        self, *, scheduler: str | None, status: str | None, due: bool, limit: int, **_: Any
    ) -> None:
        queryset = Schedule.objects.order_by("deadline_at", "id")
        if scheduler:
            queryset = queryset.filter(scheduler_id=scheduler)
        if status:
            queryset = queryset.filter(status=status)
        if due:
            queryset = queryset.filter(
                status=ScheduleStatus.ACTIVE, deadline_at__lte=timezone.now()
            )
        rows = ScheduleSerializer(queryset[: max(limit, 1)], many=True).data
        self.result(rows, lambda: table(LIST_COLUMNS, (_row(s) for s in rows)))

    def _show(self, *, schedule: str, scheduler: str | None, **_: Any) -> None:
        record = ScheduleSerializer(resolve_schedule(schedule, scheduler_id=scheduler)).data
        self.result(record, lambda: fields_table(record))

    def _create(self, **options: Any) -> None:
        names = writable(ScheduleSerializer)
        fields = validated(ScheduleSerializer, field_values(options, ScheduleSerializer, names))
        queue = fields.pop("scheduler")
        created = services.schedule_create(scheduler_id=queue.id, actor="cli", **fields)
        self._done(created, "created")

    def _update(self, *, schedule: str, scheduler: str | None, **options: Any) -> None:
        found = resolve_schedule(schedule, scheduler_id=scheduler)
        names = writable(ScheduleUpdateSerializer)
        body = field_values(options, ScheduleUpdateSerializer, names)
        require_some(body, names)
        fields = validated(ScheduleUpdateSerializer, body, instance=found)
        self._done(services.schedule_update(schedule_id=found.id, actor="cli", **fields), "updated")

    def _pause(self, *, schedule: str, scheduler: str | None, **_: Any) -> None:
        found = resolve_schedule(schedule, scheduler_id=scheduler)
        self._done(services.schedule_pause(schedule_id=found.id, actor="cli"), "paused")

    def _resume(self, *, schedule: str, scheduler: str | None, **_: Any) -> None:
        found = resolve_schedule(schedule, scheduler_id=scheduler)
        self._done(services.schedule_resume(schedule_id=found.id, actor="cli"), "resumed")

    def _trigger(self, *, schedule: str, scheduler: str | None, **_: Any) -> None:
        found = resolve_schedule(schedule, scheduler_id=scheduler)
        task = services.schedule_trigger(schedule_id=found.id, actor="cli")
        self.result(
            {"schedule": str(found.id), "task": str(task.id), "status": task.status},
            f"{_label(found)}: task {task.id} {task.status}",
        )

    def _delete(self, *, schedule: str, scheduler: str | None, **_: Any) -> None:
        found = resolve_schedule(schedule, scheduler_id=scheduler)
        services.schedule_delete(schedule_id=found.id)
        self.result({"id": str(found.id), "deleted": True}, f"deleted {_label(found)}")

    def _done(self, schedule: Schedule, verb: str) -> None:
        record = ScheduleSerializer(schedule).data
        self.result(record, _summary(record, verb))


def _row(s: dict[str, Any]) -> list[Any]:
    return [
        s["id"],
        s["scheduler"],
        s["name"],
        s["status"],
        _when(s),
        s["deadline_at"],
        s["run_count"],
    ]
