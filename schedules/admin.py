from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from schedules import services, timing
from schedules.models import Schedule
from tasks.admin import run_each, status_history, to_the_second

EDITABLE = [
    "name",
    "hash",
    "data",
    "priority",
    "cron",
    "interval_seconds",
    "run_at",
    "timezone",
    "start_at",
    "end_at",
    "min_interval_seconds",
    "max_interval_seconds",
    "backoff_factor",
]


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    list_display = [
        "__str__",
        "status",
        "when",
        "deadline",
        "last_run",
        "run_count",
        "priority",
        "created",
    ]
    ordering = ["-created_at", "-id"]  # newest first, not in random UUID order
    deadline = to_the_second("deadline_at", "deadline (UTC)")
    last_run = to_the_second("last_run_at", "last run (UTC)")
    created = to_the_second("created_at", "created (UTC)")
    list_filter = ["status", "scheduler"]
    search_fields = ["=id", "name", "hash", "cron"]
    date_hierarchy = "deadline_at"
    show_full_result_count = False
    readonly_fields = [
        "status",
        "deadline_at",
        "last_run_at",
        "run_count",
        "created_at",
        "modified_at",
        "recent_tasks",
        "history",
    ]
    fields = ["scheduler", *EDITABLE, *readonly_fields]
    actions = ["resume_schedules", "pause_schedules", "trigger_schedules"]

    @admin.display(description="status history")
    def history(self, schedule: Schedule) -> str:
        return status_history(schedule.events)

    @admin.display(description="when")
    def when(self, schedule: Schedule) -> str:
        if schedule.cron:
            words = timing.explain_cron(schedule.cron)
            return f"{schedule.cron} ({words}, {schedule.timezone})" if words else schedule.cron
        if schedule.interval_seconds:
            return f"every {schedule.interval_seconds} s"
        return f"once at {schedule.run_at:%Y-%m-%d %H:%M:%S %Z}" if schedule.run_at else "-"

    @admin.display(description="recent tasks")
    def recent_tasks(self, schedule: Schedule) -> str:
        tasks = schedule.tasks.order_by("-created_at")[:10] if schedule.pk else []
        rows = format_html_join(
            "",
            '<li><a href="{}">{}</a> {} · {}</li>',
            (
                (
                    reverse("admin:tasks_task_change", args=[task.id]),
                    str(task.id)[:8],
                    task.status,
                    f"{task.created_at:%Y-%m-%d %H:%M:%S}",
                )
                for task in tasks
            ),
        )
        return format_html("<ul>{}</ul>", rows) if tasks else "none yet"

    def get_readonly_fields(self, request: HttpRequest, obj: Schedule | None = None) -> list[str]:
        fields = list(self.readonly_fields)
        return [*fields, "scheduler"] if obj else fields

    def save_model(self, request: HttpRequest, obj: Schedule, form: Any, change: bool) -> None:
        # Through the services, so the deadline is computed and the change is logged.
        actor = request.user.get_username()
        if change:
            fields = {
                name: form.cleaned_data[name] for name in form.changed_data if name in EDITABLE
            }
            saved = services.schedule_update(schedule_id=obj.id, actor=actor, **fields)
        else:
            fields = {name: form.cleaned_data.get(name) for name in EDITABLE}
            saved = services.schedule_create(
                scheduler_id=obj.scheduler_id, actor=actor, id=obj.id, **fields
            )
        obj.__dict__.update({f.attname: getattr(saved, f.attname) for f in Schedule._meta.fields})

    @admin.action(description="Enable (resume) selected schedules", permissions=["change"])
    def resume_schedules(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        actor = request.user.get_username()
        run_each(
            self,
            request,
            queryset,
            lambda s: services.schedule_resume(schedule_id=s.id, actor=actor),
            "Resumed",
        )

    @admin.action(description="Pause selected schedules", permissions=["change"])
    def pause_schedules(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        actor = request.user.get_username()
        run_each(
            self,
            request,
            queryset,
            lambda s: services.schedule_pause(schedule_id=s.id, actor=actor),
            "Paused",
        )

    @admin.action(description="Trigger selected schedules now", permissions=["change"])
    def trigger_schedules(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        actor = request.user.get_username()
        run_each(
            self,
            request,
            queryset,
            lambda s: services.schedule_trigger(schedule_id=s.id, actor=actor),
            "Triggered",
        )
