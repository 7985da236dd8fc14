from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import JSONField, Model, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.text import Truncator

from scheduler_site import charts, tracing
from scheduler_site.storable import StorableJSONFormField
from tasks import selectors, services
from tasks.exceptions import QueueError
from tasks.leases import LeaseProof
from tasks.models import (
    ACTIVE_STATUSES,
    LEASED_STATUSES,
    REQUEUEABLE_STATUSES,
    Scheduler,
    Task,
    TaskEvent,
    TaskStatus,
    Worker,
)


def run_each(modeladmin: admin.ModelAdmin, request: HttpRequest, items, action, verb: str) -> None:
    done, refused = 0, []
    for item in items:
        try:
            action(item)
            done += 1
        except QueueError as exc:
            refused.append(exc.message)
    if done:
        modeladmin.message_user(request, f"{verb} {done}.", messages.SUCCESS)
    for message in refused[:10]:
        modeladmin.message_user(request, message, messages.WARNING)
    if len(refused) > 10:
        modeladmin.message_user(
            request, f"... and {len(refused) - 10} more refused.", messages.WARNING
        )


_DATA_KEY = re.compile(r"^([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+){0,4})[=:](.+)$")


# Every admin with a JSON input: what the database cannot hold (Infinity, a lone surrogate) is a
# form error, not a 500 at the save.
STORABLE_JSON = {JSONField: {"form_class": StorableJSONFormField}}


class DataKeySearch:
    """Search terms of the form `key=value` (or `key:value`; dotted keys for nesting, e.g.
    `boefje.id=dns`) match the `data` JSON's key on both databases; other terms go to the
    usual search_fields."""

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        plain = []
        for term in search_term.split():
            match = _DATA_KEY.match(term)
            if match is None:
                plain.append(term)
                continue
            key, value = match[1].replace(".", "__"), match[2]
            wanted = Q(**{f"data__{key}": value})
            for typed in _typed(value):
                wanted |= Q(**{f"data__{key}": typed})
            queryset = queryset.filter(wanted)
        return super().get_search_results(  # type: ignore[misc]
            request, queryset, " ".join(plain)
        )


def _typed(value: str) -> list[Any]:
    """The JSON numbers and booleans a typed-in value may stand for (data keeps types)."""
    if value in {"true", "false"}:
        return [value == "true"]
    try:
        return [int(value)]
    except ValueError:
        return []


def to_the_second(field: str, description: str) -> Callable[[Any, Model], str | None]:
    """A sortable list column showing a timestamp to the second, in UTC: Django's default
    format stops at the minute, so tasks of one minute looked alike."""

    @admin.display(description=description, ordering=field, empty_value="-")
    def column(modeladmin: Any, obj: Model) -> str | None:
        value = getattr(obj, field)
        return None if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}"

    return column


class ObjectButtons:
    """Buttons on an object's admin page (`buttons_for`: name -> label for this object and
    user), each a POST to `<pk>/do/<name>/` that calls `button_<name>(request, obj)`, one
    service, and comes back to the page with its message."""

    def buttons_for(self, request: HttpRequest, obj: Any) -> dict[str, str]:
        raise NotImplementedError

    def button_urls(self) -> list[URLPattern]:
        opts = self.model._meta  # type: ignore[attr-defined]
        view = self.admin_site.admin_view(self.button_view)  # type: ignore[attr-defined]
        name = f"{opts.app_label}_{opts.model_name}_button"
        return [path("<path:object_id>/do/<str:button>/", view, name=name)]

    def button_view(self, request: HttpRequest, object_id: str, button: str) -> HttpResponse:
        obj = self.get_object(request, object_id)  # type: ignore[attr-defined]
        if request.method != "POST" or obj is None:
            raise PermissionDenied if obj is not None else Http404("No such object.")
        if button not in self.buttons_for(request, obj):
            raise PermissionDenied  # not allowed to this user, or not in this state
        try:
            message = getattr(self, f"button_{button}")(request, obj)
            self.message_user(request, message, messages.SUCCESS)  # type: ignore[attr-defined]
        except QueueError as exc:
            self.message_user(request, exc.message, messages.WARNING)  # type: ignore[attr-defined]
        opts = self.model._meta  # type: ignore[attr-defined]
        return redirect(f"admin:{opts.app_label}_{opts.model_name}_change", obj.pk)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:  # fmt: skip
        obj = self.get_object(request, object_id)  # type: ignore[attr-defined]
        opts = self.model._meta  # type: ignore[attr-defined]
        url = f"admin:{opts.app_label}_{opts.model_name}_button"
        buttons = {
            name: (label, reverse(url, args=[obj.pk, name]))
            for name, label in (self.buttons_for(request, obj) if obj is not None else {}).items()
        }
        extra = {**(extra_context or {}), "object_buttons": buttons}
        return super().change_view(request, object_id, form_url, extra)  # type: ignore[misc]


@admin.register(Scheduler)
class SchedulerAdmin(admin.ModelAdmin):
    formfield_overrides = STORABLE_JSON
    list_display = [
        "id",
        "kind",
        "celery_queue",
        "paused",
        "queued",
        "max_queue_size",
        "retry_policy",
        "max_attempts",
        "dead_letter",
        "rate_limit",
        "concurrency_key",
        "concurrency_limit",
        "fair_key",
    ]
    list_filter = ["kind", "celery_queue", "paused", "retry_policy", "dead_letter"]
    search_fields = ["id", "description", "handler", "celery_queue"]
    readonly_fields = ["system", "created_at", "modified_at"]
    actions = ["pause_queues", "resume_queues"]

    def get_readonly_fields(self, request: HttpRequest, obj: Scheduler | None = None) -> list[str]:
        # The id is the primary key: "changing" it saved a second, empty queue beside the
        # first (its tasks and schedules stayed behind). It is chosen once, on add.
        fields = list(self.readonly_fields)
        return ["id", *fields] if obj else fields

    def has_delete_permission(self, request: HttpRequest, obj: Scheduler | None = None) -> bool:
        # The system's own queues (the pilot cycles) are never deleted: its periodic work
        # would fail every cycle. The bulk action checks this per selected queue too.
        if obj is not None and obj.system:
            return False
        return super().has_delete_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: Scheduler, form: Any, change: bool) -> None:
        if not (change and {"concurrency_key", "fair_key"} & set(form.changed_data)):
            super().save_model(request, obj, form, change)
            return
        # The row locked before the save, so pushes meanwhile are ordered with the restamp
        # (services.scheduler_flow_keys_changed says why after the save is too late).
        with transaction.atomic():
            services.scheduler_lock_flow_keys(scheduler_id=obj.id)
            super().save_model(request, obj, form, change)
            services.scheduler_flow_keys_changed(scheduler=obj)

    @admin.display(description="queued")
    def queued(self, scheduler: Scheduler) -> int:
        return scheduler.tasks.filter(status=TaskStatus.QUEUED).count()

    @admin.action(description="Pause selected queues", permissions=["change"])
    def pause_queues(self, request: HttpRequest, queryset: QuerySet[Scheduler]) -> None:
        run_each(
            self,
            request,
            queryset,
            lambda s: services.scheduler_set_paused(
                scheduler_id=s.id, paused=True, actor=request.user.username
            ),
            "Paused",
        )

    @admin.action(description="Resume selected queues", permissions=["change"])
    def resume_queues(self, request: HttpRequest, queryset: QuerySet[Scheduler]) -> None:
        run_each(
            self,
            request,
            queryset,
            lambda s: services.scheduler_set_paused(
                scheduler_id=s.id, paused=False, actor=request.user.username
            ),
            "Resumed",
        )


class StatusEventInline(admin.TabularInline):
    """A state machine's history under its object (tasks, pilots: objects the admin only
    views): read-only, oldest first."""

    extra = 0
    can_delete = False
    fields = ["at", "from_status", "to_status", "actor", "note"]
    readonly_fields = fields
    ordering = ["at", "id"]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def status_history(events: Any) -> str:
    """The same history as a read-only field, for objects the admin edits (schedules, CEs):
    an inline there would add a formset that every save must carry."""
    rows = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        (
            (f"{e.at:%Y-%m-%d %H:%M:%S}", e.from_status or "-", e.to_status, e.actor, e.note)
            for e in events.order_by("-at", "-id")[:50]
        ),
    )
    head = "<tr><th>at (UTC)</th><th>from</th><th>to</th><th>by</th><th>note</th></tr>"
    return format_html("<table>{}{}</table>", mark_safe(head), rows) if rows else "none yet"


class TaskEventInline(StatusEventInline):
    model = TaskEvent
    fields = [*StatusEventInline.fields, "trace_id"]
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskEvent]:
        return super().get_queryset(request).select_related("task")  # trace_id reads the task

    @admin.display(description="trace id")
    def trace_id(self, event: TaskEvent) -> str:
        return tracing.trace_id_of(event.task.trace_context) or "-"


class DeadLetterFilter(admin.SimpleListFilter):
    title = "dead letters"
    parameter_name = "dead_letters"

    def lookups(self, request, model_admin):
        return [("yes", "Dead letters only")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(status=TaskStatus.DEAD)
        return queryset


@admin.register(Task)
class TaskAdmin(DataKeySearch, ObjectButtons, admin.ModelAdmin):
    formfield_overrides = STORABLE_JSON
    change_list_template = "admin/tasks/task/change_list.html"
    change_form_template = "admin/tasks/task/change_form.html"
    list_display = [
        "id",
        "scheduler",
        "status_",
        "priority",
        "attempts",
        "hash",
        "error_summary",
        "created",
        "not_before_",
        "expires",
        "lease_expires",
        "modified",
    ]
    # Newest first (the task_created_idx index, read backwards), not in random UUID order.
    ordering = ["-created_at", "-id"]
    created = to_the_second("created_at", "created (UTC)")
    not_before_ = to_the_second("not_before", "not before (UTC)")
    expires = to_the_second("expires_at", "expires (UTC)")
    lease_expires = to_the_second("lease_expires_at", "lease expires (UTC)")
    modified = to_the_second("modified_at", "modified (UTC)")
    list_filter = [DeadLetterFilter, "status", "scheduler"]
    # Error text is searched as a substring: with show_full_result_count off, a page of
    # matches is read, not every row counted. `key=value` terms search `data` (DataKeySearch).
    search_fields = ["=id", "=hash", "worker", "error"]
    search_help_text = (
        "An id, a hash, a worker, error text, or key=value on the task's data (dotted keys "
        "for nesting: boefje.id=dns)."
    )
    date_hierarchy = "created_at"
    # The table holds millions of rows: no full COUNT(*) on every page.
    show_full_result_count = False
    list_select_related = False
    inlines = [TaskEventInline]
    actions = ["cancel_tasks", "requeue_tasks"]
    fields = [
        *(f.name for f in Task._meta.fields if f.name != "traceback"),
        "traceback_",
    ]
    readonly_fields = fields

    @admin.display(description="status", ordering="status")
    def status_(self, task: Task) -> str:
        # The dashboard's colours, so an EXPIRED or DEAD row stands out in a long list.
        return format_html(
            '<span class="status" style="color: {}; font-weight: bold">{}</span>',
            charts.COLORS.get(task.status, "#888888"),
            task.status,
        )

    @admin.display(description="error")
    def error_summary(self, task: Task) -> str:
        return Truncator(task.error).chars(80) or "-"

    @admin.display(description="traceback")
    def traceback_(self, task: Task) -> str:
        if not task.traceback:
            return "-"
        return format_html('<pre class="traceback">{}</pre>', task.traceback)

    def get_urls(self) -> list[URLPattern]:
        dead = path(
            "dead-letters/",
            self.admin_site.admin_view(self.dead_letters_view),
            name="tasks_task_dead_letters",
        )
        return [dead, *self.button_urls(), *super().get_urls()]

    def buttons_for(self, request: HttpRequest, obj: Task) -> dict[str, str]:
        if not self.has_cancel_permission(request):
            return {}
        buttons = {}
        if obj.status in REQUEUEABLE_STATUSES:
            buttons["requeue"] = "Requeue"
        if obj.status in LEASED_STATUSES:
            buttons["release"] = "Release (back to the queue, attempt not spent)"
        if obj.status == TaskStatus.RUNNING and obj.cancel_requested_at is None:
            buttons["cancel"] = "Ask to cancel"
        elif obj.status in ACTIVE_STATUSES and obj.status != TaskStatus.RUNNING:
            buttons["cancel"] = "Cancel"
        return buttons

    def button_requeue(self, request: HttpRequest, task: Task) -> str:
        done = task.requeue(actor=request.user.username)
        return f"Requeued: {done.status}."

    def button_cancel(self, request: HttpRequest, task: Task) -> str:
        done = task.cancel(actor=request.user.username)
        asked = done.status == TaskStatus.RUNNING
        return "Cancel requested: it stops at its next heartbeat." if asked else "Cancelled."

    def button_release(self, request: HttpRequest, task: Task) -> str:
        # An operator's override (no lease token), recorded as such in the event's note.
        done = services.task_hand_back(
            task_id=task.id,
            reason=f"released by {request.user.username} in the admin",
            actor=request.user.username,
            proof=LeaseProof(operator=True),
        )
        return f"Released: {done.status}."

    def dead_letters_view(self, request: HttpRequest) -> HttpResponse:
        """DEAD tasks grouped by queue and error, with "requeue these" per group."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            if not self.has_cancel_permission(request):
                raise PermissionDenied
            self._requeue_group(request)
            return redirect("admin:tasks_task_dead_letters")
        context = {
            **self.admin_site.each_context(request),
            "title": "Dead letters by error",
            "opts": self.model._meta,
            "groups": selectors.dead_letter_groups(),
            "can_requeue": self.has_cancel_permission(request),
        }
        return TemplateResponse(request, "admin/tasks/task/dead_letters.html", context)

    def _requeue_group(self, request: HttpRequest) -> None:
        scheduler_id = request.POST.get("scheduler", "")
        error = request.POST.get("error", "")
        done, refused = services.tasks_requeue_dead(
            scheduler_id=scheduler_id, error=error, actor=request.user.username
        )
        self.message_user(request, f"Requeued {done} of {scheduler_id}.", messages.SUCCESS)
        for message in refused[:10]:
            self.message_user(request, message, messages.WARNING)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # tasks are pushed through the queue services, not typed in

    def has_change_permission(self, request: HttpRequest, obj: Task | None = None) -> bool:
        # Viewable and acted upon through actions; never edited field by field, which would
        # bypass the state machine.
        return False

    @admin.action(description="Cancel selected tasks", permissions=["cancel"])
    def cancel_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        run_each(
            self,
            request,
            queryset.only("id"),
            lambda t: t.cancel(actor=request.user.username),
            "Cancelled",
        )

    @admin.action(
        description="Requeue selected tasks (failed, dead or cancelled)", permissions=["cancel"]
    )
    def requeue_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        run_each(
            self,
            request,
            queryset.only("id"),
            lambda t: t.requeue(actor=request.user.username),
            "Requeued",
        )

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("tasks.change_task")


@admin.register(TaskEvent)
class TaskEventAdmin(admin.ModelAdmin):
    list_display = ["at_", "task", "from_status", "to_status", "actor", "note"]
    at_ = to_the_second("at", "at (UTC)")
    list_filter = ["to_status"]
    search_fields = ["=task__id", "actor"]
    date_hierarchy = "at"
    show_full_result_count = False
    raw_id_fields = ["task"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: TaskEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: TaskEvent | None = None) -> bool:
        return False


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    """Celery workers, pull runners and beat as they last reported themselves: read-only,
    written by their own heartbeats."""

    list_display = [
        "name",
        "kind",
        "state",
        "host",
        "pid",
        "queue_names",
        "last_seen",
        "tasks_held",
        "started",
    ]
    list_filter = ["kind"]
    search_fields = ["name", "host", "account"]
    last_seen = to_the_second("last_seen_at", "last seen (UTC)")
    started = to_the_second("started_at", "started (UTC)")
    readonly_fields = [f.name for f in Worker._meta.fields]

    @admin.display(description="state")
    def state(self, worker: Worker) -> str:
        return selectors.worker_state(worker)

    @admin.display(description="queues")
    def queue_names(self, worker: Worker) -> str:
        return ", ".join(worker.queues) or "-"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Worker | None = None) -> bool:
        return False
