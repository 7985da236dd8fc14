from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from pilots import services
from pilots.models import PilotStatus, PilotSubmission
from pilots.serializers import PilotSerializer
from tasks.management.commands._base import SubcommandCommand, fields_table, table
from tasks.references import as_prefix, by_id_prefix

LIST_COLUMNS = ["id", "ce", "vo", "status", "submitted_at", "failure_reason"]


class Command(SubcommandCommand):
    help = (
        "Pilot submissions: list, show, report (counts per status, CE and VO; --store keeps it "
        "as a PilotReport). CEs and VOs have their own commands (`manage.py ce`, `manage.py "
        "vo`). `manage.py pilots ACTION --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = self.subcommands(parser)
        lst = self.action(sub, "list", "Pilots, newest first.")
        lst.add_argument("--ce", metavar="NAME", help="Only this CE's.")
        lst.add_argument("--vo", metavar="NAME", help="Only this VO's.")
        lst.add_argument("--status", choices=PilotStatus.values, help="Only in this status.")
        lst.add_argument("--limit", type=int, default=50, metavar="N", help="At most N rows.")
        show = self.action(sub, "show", "One pilot submission.")
        show.add_argument(
            "pilot", metavar="PILOT", help="The pilot's id, or a unique prefix of it."
        )
        report = self.action(sub, "report", "Counts per status, CE and VO.")
        report.add_argument("--store", action="store_true", help="Also store it as a PilotReport.")

    def _list(
        self, *, ce: str | None, vo: str | None, status: str | None, limit: int, **_: Any
    ) -> None:
        queryset = PilotSubmission.objects.select_related("ce", "vo")
        for field, value in [("ce__name", ce), ("vo__name", vo), ("status", status)]:
            if value:
                queryset = queryset.filter(**{field: value})
        rows = PilotSerializer(queryset[: max(limit, 1)], many=True).data
        self.result(rows, lambda: table(LIST_COLUMNS, ([r[c] for c in LIST_COLUMNS] for r in rows)))

    def _show(self, *, pilot: str, **_: Any) -> None:
        pilots = PilotSubmission.objects.select_related("ce", "vo")
        prefix = as_prefix(pilot)
        found = by_id_prefix(pilots, prefix, noun="pilot") if prefix else None
        if found is None:
            raise CommandError(f"No pilot id is or starts with {pilot!r}.")
        record = PilotSerializer(found).data
        self.result(record, lambda: fields_table(record))

    def _report(self, *, store: bool, **_: Any) -> None:
        if store:
            report = services.pilot_report_create()
            counts = {"by_status": report.by_status, "by_ce": report.by_ce, "by_vo": report.by_vo}
        else:
            counts = services.pilot_counts()
        self.result(counts, lambda: _report_table(counts))


def _report_table(counts: dict[str, Any]) -> Any:
    statuses = PilotStatus.values
    rows = [["all", "", *(counts["by_status"].get(s, 0) for s in statuses)]]
    for kind in ("ce", "vo"):
        for name, by_status in sorted(counts[f"by_{kind}"].items()):
            rows.append([kind, name, *(by_status.get(s, 0) for s in statuses)])
    return table(["of", "name", *(s.lower() for s in statuses)], rows)
