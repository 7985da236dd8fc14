from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from schedules import services, timing
from schedules.models import Schedule, ScheduleStatus
from schedules.selectors import find_schedule
from tasks.management.commands._base import SubcommandCommand, parse_json_object


def _when(value: str) -> datetime:
    parsed = parse_datetime(value)
    if parsed is None or parsed.tzinfo is None:
        raise CommandError(
            f"{value!r}: give an ISO 8601 time with its offset, e.g. 2026-01-31T09:00:00+01:00"
        )
    return parsed


FLOW_OPTIONS = (
    "expire_seconds",
    "failure_backoff_factor",
    "failure_backoff_max_seconds",
    "max_consecutive_failures",
)


class Command(SubcommandCommand):
    help = (
        "Operate on schedules: list, create, pause, resume, trigger (run now), delete. "
        "`manage.py schedule <action> --help` for each."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        lst = sub.add_parser("list", help="Schedules with status, next and last run.")
        lst.add_argument("--scheduler")
        lst.add_argument("--status", choices=ScheduleStatus.values)
        lst.add_argument("--due", action="store_true", help="Only those due now.")
        lst.add_argument("--limit", type=int, default=50)
        create = sub.add_parser(
            "create", help="Create a schedule: one of --cron, --interval, --run-at."
        )
        create.add_argument("--scheduler", required=True)
        create.add_argument("--cron", help='5 fields, e.g. "*/15 * * * *", in --timezone.')
        create.add_argument("--interval", type=int, dest="interval_seconds", help="Seconds.")
        create.add_argument("--run-at", help="One-off, ISO 8601 with offset.")
        create.add_argument("--timezone", default="UTC", help="IANA name, e.g. Europe/Amsterdam.")
        create.add_argument("--data", help="JSON object, the task's payload.")
        create.add_argument("--priority", type=int, default=0)
        create.add_argument("--hash")
        create.add_argument(
            "--name", help="Unique per scheduler; other actions take it for the id."
        )
        create.add_argument("--start-at")
        create.add_argument("--end-at")
        create.add_argument(
            "--expire-seconds",
            type=int,
            help="Its tasks expire this many seconds after their occurrence if not handed out.",
        )
        create.add_argument(
            "--failure-backoff-factor",
            type=float,
            help="After a failed run the next waits interval * factor^failures in a row.",
        )
        create.add_argument(
            "--failure-backoff-max-seconds", type=int, help="Cap of that cooldown (default 1 day)."
        )
        create.add_argument(
            "--max-consecutive-failures",
            type=int,
            help="Pause the schedule after this many failed runs in a row (resume clears it).",
        )
        for name, text in [
            ("pause", "Pause: no tasks until resumed."),
            ("resume", "Resume: next run recomputed from now (no burst of missed runs)."),
            ("trigger", "Run now, out of turn (refused while a task of it is active)."),
            ("delete", "Delete the schedule (its tasks stay)."),
        ]:
            action = sub.add_parser(name, help=text)
            action.add_argument("schedule", metavar="SCHEDULE", help="Its id, or its name.")
            action.add_argument(
                "--scheduler", help="The scheduler of a named schedule (when several have it)."
            )

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
        self.stdout.write(
            f"{'id':36}  {'scheduler':16} {'status':8} {'when':28} {'next run (UTC)':20} runs  name"
        )
        for s in queryset[: max(limit, 1)]:
            when = s.cron or (
                f"every {s.interval_seconds}s"
                if s.interval_seconds
                else f"once {s.run_at:%Y-%m-%d %H:%M}"
            )
            nxt = f"{s.deadline_at:%Y-%m-%d %H:%M:%S}" if s.deadline_at else "-"
            self.stdout.write(
                f"{s.id}  {s.scheduler_id:16} {s.status:8} {when:28} {nxt:20} "
                f"{s.run_count:<5} {s.name or ''}".rstrip()
                + (f"  [{s.paused_reason}]" if s.status == ScheduleStatus.PAUSED else "")
            )

    def _create(
        self,
        *,
        scheduler: str,
        data: str | None,
        run_at: str | None,
        start_at: str | None,
        end_at: str | None,
        cron: str | None,
        **options: Any,
    ) -> None:
        fields = {
            "cron": " ".join((cron or "").split()),
            "interval_seconds": options["interval_seconds"],
            "run_at": _when(run_at) if run_at else None,
            "start_at": _when(start_at) if start_at else None,
            "end_at": _when(end_at) if end_at else None,
            "timezone": options["timezone"],
            "data": parse_json_object(data, option="--data"),
            "priority": options["priority"],
            "hash": options["hash"],
            "name": options["name"],
        }
        for flow in FLOW_OPTIONS:  # given ones only: the model's defaults stand otherwise
            if options.get(flow) is not None:
                fields[flow] = options[flow]
        schedule = services.schedule_create(scheduler_id=scheduler, actor="cli", **fields)
        words = timing.explain_cron(schedule.cron) if schedule.cron else ""
        self.stdout.write(
            f"created {schedule.id} ({schedule.status}); next run {schedule.deadline_at}"
            + (f"; {words}" if words else "")
        )

    def _pause(self, *, schedule: str, scheduler: str | None, **_: Any) -> None:
        found = find_schedule(schedule, scheduler_id=scheduler)
        paused = services.schedule_pause(schedule_id=found.id, actor="cli")
        self.stdout.write(f"{_label(paused)}: {paused.status}")

    def _resume(self, *, schedule: str, scheduler: str | None, **_: Any) -> None:
        found = find_schedule(schedule, scheduler_id=scheduler)
        resumed = services.schedule_resume(schedule_id=found.id, actor="cli")
        self.stdout.write(f"{_label(resumed)}: {resumed.status}, next run {resumed.deadline_at}")

    def _trigger(self, *, schedule: str, scheduler: str | None, **_: Any) -> None:
        found = find_schedule(schedule, scheduler_id=scheduler)
        task = services.schedule_trigger(schedule_id=found.id, actor="cli")
        self.stdout.write(f"{_label(found)}: task {task.id} QUEUED")

    def _delete(self, *, schedule: str, scheduler: str | None, **_: Any) -> None:
        found = find_schedule(schedule, scheduler_id=scheduler)
        services.schedule_delete(schedule_id=found.id)
        self.stdout.write(f"deleted {_label(found)}")


def _label(schedule: Schedule) -> str:
    return (
        f"{schedule.id} ({schedule.scheduler_id}/{schedule.name})"
        if schedule.name
        else (str(schedule.id))
    )
