from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from tasks import selectors, services
from tasks.management.commands._base import SubcommandCommand, fields_table, table
from tasks.management.commands._fields import (
    add_field_options,
    field_values,
    require_some,
    validated,
)
from tasks.models import Scheduler, TaskStatus
from tasks.serializers import SCHEDULER_SETTABLE, SchedulerSerializer, SchedulerUpdateSerializer

ID_LABEL = {"id": "SCHEDULER_ID"}


class Command(SubcommandCommand):
    help = (
        "Operate on schedulers (named queues): list, show, create, update, pause, resume, "
        "delete. Options of create and update are the API's fields. "
        "`manage.py scheduler ACTION --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = self.subcommands(parser)
        self.action(sub, "list", "Queues with their task counts per status.")
        self._with_id(sub, "show", "One queue: its settings and task counts.")
        for name, text in [("create", "Create a queue."), ("update", "Change a queue's settings.")]:
            cmd = self._with_id(sub, name, text)
            add_field_options(
                cmd, SchedulerSerializer, SCHEDULER_SETTABLE, updating=name == "update"
            )
        for name, text in [
            ("pause", "Pause a queue: nothing is popped or dispatched from it."),
            ("resume", "Resume a paused queue."),
            ("delete", "Delete a queue that has no active tasks."),
        ]:
            self._with_id(sub, name, text)

    def _with_id(self, sub: Any, name: str, text: str) -> CommandParser:
        cmd = self.action(sub, name, text)
        cmd.add_argument("scheduler_id", metavar="SCHEDULER_ID", help="The queue's id.")
        return cmd

    def _get(self, scheduler_id: str) -> Scheduler:
        scheduler = Scheduler.objects.filter(id=scheduler_id).first()
        if scheduler is None:
            raise CommandError(f"Scheduler {scheduler_id!r} does not exist.")
        return scheduler

    def _data(self, schedulers: list[Scheduler]) -> list[dict[str, Any]]:
        counts = selectors.status_counts([s.id for s in schedulers])
        return SchedulerSerializer(schedulers, many=True, context={"counts": counts}).data

    def _list(self, **_: Any) -> None:
        rows = self._data(list(Scheduler.objects.order_by("id")))
        self.result(rows, lambda: _list_table(rows))

    def _show(self, *, scheduler_id: str, **_: Any) -> None:
        [row] = self._data([self._get(scheduler_id)])
        self.result(row, lambda: fields_table(row))

    def _create(self, *, scheduler_id: str, **options: Any) -> None:
        body = {
            "id": scheduler_id,
            **field_values(options, SchedulerSerializer, SCHEDULER_SETTABLE),
        }
        fields = validated(SchedulerSerializer, body, labels=ID_LABEL)
        scheduler = services.scheduler_create(**fields)
        self.result(self._data([scheduler])[0], f"created {scheduler.id}")

    def _update(self, *, scheduler_id: str, **options: Any) -> None:
        scheduler = self._get(scheduler_id)
        body = field_values(options, SchedulerUpdateSerializer, SCHEDULER_SETTABLE)
        require_some(body, SCHEDULER_SETTABLE)
        fields = validated(SchedulerUpdateSerializer, body, instance=scheduler, labels=ID_LABEL)
        scheduler = services.scheduler_update(scheduler=scheduler, **fields)
        self.result(self._data([scheduler])[0], f"updated {scheduler_id}")

    def _pause(self, *, scheduler_id: str, **_: Any) -> None:
        scheduler = services.scheduler_set_paused(
            scheduler_id=scheduler_id, paused=True, actor="cli"
        )
        self.result(self._data([scheduler])[0], f"paused {scheduler_id}")

    def _resume(self, *, scheduler_id: str, **_: Any) -> None:
        scheduler = services.scheduler_set_paused(
            scheduler_id=scheduler_id, paused=False, actor="cli"
        )
        self.result(self._data([scheduler])[0], f"resumed {scheduler_id}")

    def _delete(self, *, scheduler_id: str, **_: Any) -> None:
        services.scheduler_delete(scheduler_id=scheduler_id)
        self.result({"id": scheduler_id, "deleted": True}, f"deleted {scheduler_id}")


def _list_table(rows: list[dict[str, Any]]) -> Any:
    statuses = TaskStatus.values
    return table(
        ["id", "kind", "paused", "max", *(status.lower() for status in statuses)],
        (
            [row["id"], row["kind"], row["paused"], row["max_queue_size"]]
            + [row["counts"].get(status, 0) for status in statuses]
            for row in rows
        ),
    )
