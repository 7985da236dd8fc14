from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import Field, QuerySet
from django.http import HttpRequest, JsonResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from schedules import services, timing
from schedules.models import SCHEDULE_SETTABLE, Schedule, ScheduleStatus
from tasks.admin import (
    STORABLE_JSON,
    DataKeySearch,
    ObjectButtons,
    run_each,
    status_history,
    to_the_second,
)

EDITABLE = SCHEDULE_SETTABLE  # the API's writable fields (schedules.models)


class _DefaultingIntegerField(forms.IntegerField):
    """An integer whose empty input means its initial value (the model's default), so a form
    posted without it (a script, an older page) keeps the default rather than failing."""

    def clean(self, value: Any) -> Any:
        cleaned = super().clean(value)
        return self.initial if cleaned is None else cleaned


@admin.register(Schedule)
class ScheduleAdmin(DataKeySearch, ObjectButtons, admin.ModelAdmin):
    formfield_overrides = STORABLE_JSON
    change_form_template = "admin/schedules/schedule/change_form.html"
    list_display = [
        "__str__",
        "status",
        "failures",
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
    search_help_text = (
        "An id, a name, a hash, a cron expression, or key=value on the schedule's data."
    )
    date_hierarchy = "deadline_at"
    show_full_result_count = False
    readonly_fields = [
        "status",
        "paused_reason",
        "consecutive_failures",
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

    @admin.display(description="failures in a row", ordering="consecutive_failures")
    def failures(self, schedule: Schedule) -> str:
        # Why a PAUSED schedule stopped shows beside it: the failure policy's reason.
        text = str(schedule.consecutive_failures)
        if schedule.status == ScheduleStatus.PAUSED and schedule.paused_reason:
            return format_html(
                '{} <span title="{}">⏸ {}</span>',
                text,
                schedule.paused_reason,
                schedule.paused_reason[:60],
            )
        return text

    @admin.display(description="status history")
    def history(self, schedule: Schedule) -> str:
        return status_history(schedule.events)

    class Media:
        # Django's own select2 (the admin's autocomplete widgets use it) makes the time zone
        # a searchable select; schedule_form.js adds the cron preview as you type.
        css = {"all": ["admin/css/vendor/select2/select2.min.css"]}
        js = [
            "admin/js/vendor/jquery/jquery.min.js",
            "admin/js/vendor/select2/select2.full.min.js",
            "admin/js/jquery.init.js",
            "scheduler/schedule_form.js",
        ]

    def formfield_for_dbfield(self, db_field: Field, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "timezone":
            zones = timing.zone_names()
            return forms.ChoiceField(
                choices=[(name, name) for name in zones],
                initial="UTC",
                help_text="The IANA zone cron is evaluated in (type to search).",
                widget=forms.Select(attrs={"class": "tz-select"}),
            )
        if db_field.name == "failure_backoff_max_seconds":
            return _DefaultingIntegerField(
                required=False,
                min_value=1,
                initial=db_field.default,
                help_text=f"{db_field.help_text} Empty: {db_field.default} (a day).",
            )
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    def get_urls(self) -> list[URLPattern]:
        preview = path(
            "cron-preview/",
            self.admin_site.admin_view(self.cron_preview_view),
            name="schedules_schedule_cron_preview",
        )
        return [preview, *self.button_urls(), *super().get_urls()]

    def cron_preview_view(self, request: HttpRequest) -> JsonResponse:
        """GET ?cron=...&timezone=...: the expression in words and its next 5 runs in that
        zone, or the problem (the schedule form's helper)."""
        cron = request.GET.get("cron", "").strip()
        tz_name = request.GET.get("timezone", "UTC").strip()
        return JsonResponse(timing.cron_preview(cron, tz_name, after=timezone.now()))

    def buttons_for(self, request: HttpRequest, obj: Schedule) -> dict[str, str]:
        if not self.has_change_permission(request, obj):
            return {}
        buttons = {}
        if obj.status == ScheduleStatus.ACTIVE:
            buttons["pause"] = "Pause"
        if obj.status == ScheduleStatus.PAUSED:
            buttons["resume"] = "Resume"
        if obj.status != ScheduleStatus.FINISHED:
            buttons["trigger"] = "Trigger now"
        return buttons

    def button_pause(self, request: HttpRequest, schedule: Schedule) -> str:
        schedule.pause(actor=request.user.get_username())
        return "Paused."

    def button_resume(self, request: HttpRequest, schedule: Schedule) -> str:
        done = schedule.resume(actor=request.user.get_username())
        return f"Resumed: next run {done.deadline_at:%Y-%m-%d %H:%M:%S} UTC."

    def button_trigger(self, request: HttpRequest, schedule: Schedule) -> str:
        task = services.schedule_trigger(schedule_id=schedule.id, actor=request.user.get_username())
        return f"Triggered: task {task.id} queued."

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
        history = reverse("admin:tasks_task_changelist") + f"?schedule__id__exact={schedule.pk}"
        link = format_html('<a href="{}" class="run-history">Run history (every task)</a>', history)
        return format_html("<ul>{}</ul>{}", rows, link) if tasks else "none yet"

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
            lambda s: s.resume(actor=actor),
            "Resumed",
        )

    @admin.action(description="Pause selected schedules", permissions=["change"])
    def pause_schedules(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        actor = request.user.get_username()
        run_each(
            self,
            request,
            queryset,
            lambda s: s.pause(actor=actor),
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
