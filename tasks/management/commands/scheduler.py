from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import models

from tasks import selectors, services
from tasks.management.commands._base import SubcommandCommand, parse_json_object
from tasks.models import Scheduler
from tasks.serializers import SCHEDULER_SETTABLE

YES_NO = {"yes": True, "no": False}


def _add_option(parser: CommandParser, name: str) -> None:
    """An option for one settable field, typed after the model's field: the API's list."""
    field = Scheduler._meta.get_field(name)
    option = f"--{name.replace('_', '-')}"
    text = str(field.help_text).replace("%", "%%") or None  # argparse formats help with %
    if isinstance(field, models.BooleanField):
        parser.add_argument(option, choices=list(YES_NO), help=text)
    elif isinstance(field, models.JSONField):
        parser.add_argument(option, metavar="JSON", help=text)
    elif field.choices:
        parser.add_argument(option, choices=[value for value, _ in field.choices], help=text)
    elif isinstance(field, models.IntegerField):
        parser.add_argument(option, type=int, help=text)
    else:
        parser.add_argument(option, help=text)


def _value(name: str, raw: Any) -> Any:
    field = Scheduler._meta.get_field(name)
    if isinstance(field, models.BooleanField):
        return YES_NO[raw]
    if isinstance(field, models.JSONField):
        return parse_json_object(raw, option=f"--{name.replace('_', '-')}")
    return raw


class Command(SubcommandCommand):
    help = (
        "Operate on schedulers (named queues): list, create, update, pause, resume, delete. "
        "`manage.py scheduler <action> --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        sub.add_parser("list", help="Queues with their task counts per status.")
        for name, text in [("create", "Create a queue."), ("update", "Change a queue's settings.")]:
            cmd = sub.add_parser(name, help=text)
            cmd.add_argument("scheduler_id")
            for field in SCHEDULER_SETTABLE:
                _add_option(cmd, field)
        for name, text in [
            ("pause", "Pause a queue: nothing is popped or dispatched from it."),
            ("resume", "Resume a paused queue."),
            ("delete", "Delete a queue that has no active tasks."),
        ]:
            sub.add_parser(name, help=text).add_argument("scheduler_id")

    @staticmethod
    def _fields(options: dict[str, Any]) -> dict[str, Any]:
        given = [name for name in SCHEDULER_SETTABLE if options.get(name) is not None]
        return {name: _value(name, options[name]) for name in given}

    def _list(self, **_: Any) -> None:
        counts = selectors.status_counts()
        self.stdout.write(f"{'id':24} {'kind':7} {'paused':6} {'max':>6}  counts")
        for scheduler in Scheduler.objects.order_by("id"):
            row = counts.get(scheduler.id, {})
            summary = " ".join(f"{status}={n}" for status, n in row.items() if n)
            self.stdout.write(
                f"{scheduler.id:24} {scheduler.kind:7} {'yes' if scheduler.paused else 'no':6} "
                f"{scheduler.max_queue_size:6}  {summary or '-'}"
            )

    def _create(self, *, scheduler_id: str, **options: Any) -> None:
        if Scheduler.objects.filter(id=scheduler_id).exists():
            raise CommandError(f"Scheduler {scheduler_id!r} exists already; use update.")
        services.scheduler_create(id=scheduler_id, **self._fields(options))
        self.stdout.write(f"created {scheduler_id}")

    def _update(self, *, scheduler_id: str, **options: Any) -> None:
        scheduler = Scheduler.objects.filter(id=scheduler_id).first()
        if scheduler is None:
            raise CommandError(f"Scheduler {scheduler_id!r} does not exist.")
        services.scheduler_update(scheduler=scheduler, **self._fields(options))
        self.stdout.write(f"updated {scheduler_id}")

    def _pause(self, *, scheduler_id: str, **_: Any) -> None:
        services.scheduler_set_paused(scheduler_id=scheduler_id, paused=True, actor="cli")
        self.stdout.write(f"paused {scheduler_id}")

    def _resume(self, *, scheduler_id: str, **_: Any) -> None:
        services.scheduler_set_paused(scheduler_id=scheduler_id, paused=False, actor="cli")
        self.stdout.write(f"resumed {scheduler_id}")

    def _delete(self, *, scheduler_id: str, **_: Any) -> None:
        services.scheduler_delete(scheduler_id=scheduler_id)
        self.stdout.write(f"deleted {scheduler_id}")
