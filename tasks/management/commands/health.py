from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from scheduler_site.health import DEGRADED, DOWN, system_health
from tasks.management.commands._base import OurCommand, table


class Command(OurCommand):
    help = (
        "The health report of GET /api/health/: database, broker, workers per celery queue "
        "with work, beat's last tick, runners per pull queue; each ok, degraded or down with "
        "its reason. Exit code 1 when one is down (with --strict: also when degraded), for "
        "cron jobs and monitoring scripts."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--strict", action="store_true", help="Exit code 1 on degraded too, not only down."
        )
        parser.add_argument(
            "--json", action="store_true", help="Print one JSON document (the API's shape)."
        )

    def handle(self, *args: Any, strict: bool, **_: Any) -> None:
        report = system_health()
        rows = [(c.name, c.status, c.reason) for c in report.components]
        self.result(
            report.as_dict(),
            lambda: table(
                ["component", "status", "reason"], rows, title=f"overall: {report.status}"
            ),
        )
        failing = {DOWN, DEGRADED} if strict else {DOWN}
        if report.status in failing:
            names = ", ".join(c.name for c in report.components if c.status in failing)
            raise CommandError(f"{report.status}: {names}")
