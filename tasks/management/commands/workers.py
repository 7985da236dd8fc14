from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from tasks import selectors
from tasks.management.commands._base import SubcommandCommand, table
from tasks.models import WorkerKind
from tasks.serializers import WorkerSerializer

COLUMNS = ["name", "kind", "state", "host", "pid", "queues", "last_seen_at", "tasks_held"]


class Command(SubcommandCommand):
    help = (
        "Celery workers, pull runners and beat as they last reported themselves (GET "
        "/api/workers/): live, stopped or lost, their queues and the tasks they hold. "
        "`manage.py workers list --help`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = self.subcommands(parser)
        lst = self.action(sub, "list", "Workers, runners and beat, by kind and name.")
        lst.add_argument("--kind", choices=WorkerKind.values, help="Only this kind.")

    def _list(self, *, kind: str | None, **_: Any) -> None:
        rows = WorkerSerializer(selectors.worker_list(kind=kind), many=True).data
        self.result(rows, lambda: table(COLUMNS, ([r[c] for c in COLUMNS] for r in rows)))
