from __future__ import annotations

import dataclasses
from typing import Any

from django.core.management.base import CommandParser
from rich.console import Group
from rich.table import Table

from schedules.beat_import import (
    CREATED,
    NOT_CONVERTED,
    SKIPPED,
    UNCHANGED,
    UPDATED,
    Row,
    import_periodic_tasks,
)
from tasks.management.commands._base import OurCommand

STYLES = {CREATED: "green", UPDATED: "cyan", UNCHANGED: "dim", NOT_CONVERTED: "red", SKIPPED: ""}


class Command(OurCommand):
    help = (
        "Import django-celery-beat's PeriodicTasks as Schedules: each on the celery queue of its "
        "task (handler celery:<task>, made when missing), named as in beat, so a re-run updates "
        "rather than duplicates. crontab (with its time zone), interval, clocked (a one-off), "
        "one_off, start_time, enabled, args/kwargs convert; what does not (solar, sub-second "
        "intervals, expiry, routing) is reported in the table, with the DST rules that differ. "
        "Beat keeps running them until you disable them there (--disable-source does, in the "
        "same transaction as each import)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Show what would happen; change nothing."
        )
        parser.add_argument(
            "--disable-source",
            action="store_true",
            help="Disable each converted PeriodicTask in beat, so it runs here only.",
        )
        parser.add_argument(
            "--paused",
            action="store_true",
            help="Import every schedule PAUSED (resume each when you disable it in beat).",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="Print one JSON document: every row with its outcome and notes, and the counts.",
        )

    def handle(
        self, *args: Any, dry_run: bool, disable_source: bool, paused: bool, **_: Any
    ) -> None:
        rows = import_periodic_tasks(dry_run=dry_run, disable_source=disable_source, paused=paused)
        counts = {outcome: sum(r.outcome == outcome for r in rows) for outcome in STYLES}
        self.result(
            {"dry_run": dry_run, "rows": [dataclasses.asdict(r) for r in rows], "counts": counts},
            lambda: Group(_table(rows, dry_run=dry_run), _summary(rows, dry_run=dry_run)),
        )


def _table(rows: list[Row], *, dry_run: bool) -> Table:
    title = "django-celery-beat → schedules" + (" (dry run: nothing changed)" if dry_run else "")
    table = Table(title=title, show_lines=True)
    for column in ("beat task", "Celery task", "in beat", "scheduler", "outcome", "notes"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if row.outcome == SKIPPED:
            continue  # the scheduler's own jobs: counted in the summary
        outcome = f"[{STYLES.get(row.outcome, '')}]{row.outcome}[/]"
        table.add_row(
            row.name, row.task, row.schedule, row.scheduler, outcome, "\n".join(row.notes)
        )
    return table


def _summary(rows: list[Row], *, dry_run: bool) -> str:
    counts = {outcome: sum(r.outcome == outcome for r in rows) for outcome in STYLES}
    converted = counts[CREATED] + counts[UPDATED] + counts[UNCHANGED]
    verb = "would convert" if dry_run else "converted"
    return (
        f"{verb} {converted} ({counts[CREATED]} created, {counts[UPDATED]} updated, "
        f"{counts[UNCHANGED]} unchanged); not converted {counts[NOT_CONVERTED]}; "
        f"skipped {counts[SKIPPED]} (the scheduler's own periodic jobs)"
    )
