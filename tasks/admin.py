from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Any

from django.contrib import admin, messages
from django.db.models import Model, QuerySet
from django.http import HttpRequest

from tasks import services
from tasks.exceptions import QueueError
from tasks.models import Scheduler, Task, TaskEvent, TaskStatus


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


def to_the_second(field: str, description: str) -> Callable[[Any, Model], str | None]:
    """A sortable list column showing a timestamp to the second, in UTC: Django's default
    format stops at the minute, so tasks of one minute looked alike."""

    @admin.display(description=description, ordering=field, empty_value="-")
    def column(modeladmin: Any, obj: Model) -> str | None:
        value = getattr(obj, field)
        return None if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}"

    return column


@admin.register(Scheduler)
class SchedulerAdmin(admin.ModelAdmin):
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


class TaskEventInline(admin.TabularInline):
    model = TaskEvent
    extra = 0
    can_delete = False
    fields = ["at", "from_status", "to_status", "actor", "note"]
    readonly_fields = fields
    ordering = ["at", "id"]

    def has_add_permission(self, request: HttpRequest, obj: Task | None = None) -> bool:
        return False


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
class TaskAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "scheduler",
        "status",
        "priority",
        "attempts",
        "hash",
        "created",
        "not_before_",
        "lease_expires",
        "modified",
    ]
    # Newest first (the task_created_idx index, read backwards), not in random UUID order.
    ordering = ["-created_at", "-id"]
    created = to_the_second("created_at", "created (UTC)")
    not_before_ = to_the_second("not_before", "not before (UTC)")
    lease_expires = to_the_second("lease_expires_at", "lease expires (UTC)")
    modified = to_the_second("modified_at", "modified (UTC)")
    list_filter = [DeadLetterFilter, "status", "scheduler"]
    search_fields = ["=id", "=hash", "worker"]
    date_hierarchy = "created_at"
    # The table holds millions of rows: no full COUNT(*) on every page.
    show_full_result_count = False
    list_select_related = False
    inlines = [TaskEventInline]
    actions = ["cancel_tasks", "requeue_tasks"]
    readonly_fields = [f.name for f in Task._meta.fields]

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
            lambda t: services.task_cancel(task_id=t.id, actor=request.user.username),
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
            lambda t: services.task_requeue(task_id=t.id, actor=request.user.username),
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
