from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from pilots import services
from pilots.models import CEStatus, ComputeElement, PilotStatus, PilotSubmission
from tasks.management.commands._base import SubcommandCommand, dumps


class Command(SubcommandCommand):
    help = (
        "Pilots: list CEs (ces), drain/ban/activate a CE, submit one pilot now, list pilots, "
        "print a report (counts per status, CE and VO; --store keeps it as a PilotReport). "
        "`manage.py pilots <action> --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        sub.add_parser("ces", help="Compute elements with status, active and free slots.")
        for name, text in [
            ("drain", "No new pilots; running ones finish."),
            ("ban", "No new pilots; SUBMITTED ones are failed."),
            ("activate", "Take new pilots again."),
        ]:
            sub.add_parser(name, help=text).add_argument("ce")
        submit = sub.add_parser(
            "submit", help="Submit one pilot now (refused without a free slot)."
        )
        submit.add_argument("ce")
        submit.add_argument("--vo", required=True)
        lst = sub.add_parser("list", help="Pilots, newest first.")
        lst.add_argument("--ce")
        lst.add_argument("--vo")
        lst.add_argument("--status", choices=PilotStatus.values)
        lst.add_argument("--limit", type=int, default=50)
        report = sub.add_parser("report", help="Counts per status, CE and VO.")
        report.add_argument("--store", action="store_true", help="Also store it as a PilotReport.")

    def _drain(self, *, ce: str, **_: Any) -> None:
        self._set_status(ce, CEStatus.DRAINING)

    def _ban(self, *, ce: str, **_: Any) -> None:
        self._set_status(ce, CEStatus.BANNED)

    def _activate(self, *, ce: str, **_: Any) -> None:
        self._set_status(ce, CEStatus.ACTIVE)

    def _set_status(self, name: str, to_status: str) -> None:
        ce = services.ce_set_status(name=name, to_status=to_status, actor="cli")
        self.stdout.write(f"{ce.name}: {ce.status}")

    def _ces(self, **_: Any) -> None:
        self.stdout.write(f"{'name':24} {'status':9} {'cap':>4} {'active':>6} {'free':>5}  VOs")
        for ce in ComputeElement.objects.prefetch_related("vos"):
            active = services.active_pilots(ce)
            vos = ",".join(vo.name for vo in ce.vos.all())
            free = max(ce.capacity - active, 0)
            self.stdout.write(
                f"{ce.name:24} {ce.status:9} {ce.capacity:4} {active:6} {free:5}  {vos}"
            )

    def _submit(self, *, ce: str, vo: str, **_: Any) -> None:
        pilot = services.pilot_submit(ce_name=ce, vo_name=vo, actor="cli")
        self.stdout.write(
            f"pilot {pilot.id}: {pilot.status} {pilot.external_id or pilot.failure_reason}"
        )

    def _list(
        self, *, ce: str | None, vo: str | None, status: str | None, limit: int, **_: Any
    ) -> None:
        queryset = PilotSubmission.objects.select_related("ce", "vo")
        for field, value in [("ce__name", ce), ("vo__name", vo), ("status", status)]:
            if value:
                queryset = queryset.filter(**{field: value})
        for pilot in queryset[: max(limit, 1)]:
            self.stdout.write(
                f"{pilot.id}  {pilot.ce.name:20} {pilot.vo.name:12} {pilot.status:9} "
                f"{pilot.submitted_at:%Y-%m-%d %H:%M:%S}  {pilot.failure_reason}"
            )

    def _report(self, *, store: bool, **_: Any) -> None:
        if store:
            report = services.pilot_report_create()
            counts = {"by_status": report.by_status, "by_ce": report.by_ce, "by_vo": report.by_vo}
        else:
            counts = services.pilot_counts()
        self.stdout.write(dumps(counts))
