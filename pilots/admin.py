from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest

from pilots import services
from pilots.models import (
    ACTIVE_PILOT_STATUSES,
    CEMove,
    ComputeElement,
    PilotEvent,
    PilotReport,
    PilotSubmission,
    VirtualOrganisation,
)
from tasks.admin import STORABLE_JSON, StatusEventInline, run_each, status_history, to_the_second


@admin.register(VirtualOrganisation)
class VOAdmin(admin.ModelAdmin):
    list_display = ["name", "enabled", "created_at"]
    list_filter = ["enabled"]
    search_fields = ["name"]


class PilotEventInline(StatusEventInline):
    model = PilotEvent


@admin.register(ComputeElement)
class ComputeElementAdmin(admin.ModelAdmin):
    formfield_overrides = STORABLE_JSON
    list_display = [
        "name",
        "status",
        "capacity",
        "active",
        "free",
        "reliability",
        "backend",
        "served_vos",
    ]
    list_filter = ["status", "backend", "vos"]
    search_fields = ["name"]
    filter_horizontal = ["vos"]
    readonly_fields = ["status", "created_at", "modified_at", "history"]
    actions = ["drain", "ban", "activate", "submit_one"]

    @admin.display(description="status history")
    def history(self, ce: ComputeElement) -> str:
        return status_history(ce.events)

    def get_queryset(self, request: HttpRequest) -> QuerySet[ComputeElement]:
        active = Count("pilots", filter=Q(pilots__status__in=list(ACTIVE_PILOT_STATUSES)))
        return super().get_queryset(request).annotate(active_count=active).prefetch_related("vos")

    @admin.display(description="active pilots", ordering="active_count")
    def active(self, ce: ComputeElement) -> int:
        return ce.active_count

    @admin.display(description="free slots")
    def free(self, ce: ComputeElement) -> int:
        return max(ce.capacity - ce.active_count, 0)

    @admin.display(description="VOs")
    def served_vos(self, ce: ComputeElement) -> str:
        return ", ".join(vo.name for vo in ce.vos.all())

    def _set(
        self, request: HttpRequest, queryset: QuerySet[ComputeElement], move: CEMove, verb: str
    ) -> None:
        actor = request.user.get_username()
        run_each(self, request, queryset, lambda ce: move(ce, actor=actor), verb)

    @admin.action(
        description="Drain selected CEs (no new pilots; running ones finish)",
        permissions=["change"],
    )
    def drain(self, request: HttpRequest, queryset: QuerySet[ComputeElement]) -> None:
        self._set(request, queryset, ComputeElement.drain, "Drained")

    @admin.action(
        description="Ban selected CEs (no new pilots; submitted ones fail)", permissions=["change"]
    )
    def ban(self, request: HttpRequest, queryset: QuerySet[ComputeElement]) -> None:
        self._set(request, queryset, ComputeElement.ban, "Banned")

    @admin.action(description="Activate selected CEs", permissions=["change"])
    def activate(self, request: HttpRequest, queryset: QuerySet[ComputeElement]) -> None:
        self._set(request, queryset, ComputeElement.activate, "Activated")

    @admin.action(
        description="Submit one pilot now (for the first enabled VO served)", permissions=["change"]
    )
    def submit_one(self, request: HttpRequest, queryset: QuerySet[ComputeElement]) -> None:
        actor = request.user.get_username()

        def submit(ce: ComputeElement) -> None:
            vo = ce.vos.filter(enabled=True).order_by("name").first()
            services.pilot_submit(ce_name=ce.name, vo_name=vo.name if vo else "", actor=actor)

        run_each(self, request, queryset, submit, "Submitted a pilot to")


@admin.register(PilotSubmission)
class PilotAdmin(admin.ModelAdmin):
    inlines = [PilotEventInline]
    list_display = [
        "id",
        "ce",
        "vo",
        "status",
        "external_id",
        "submitted",
        "started",
        "finished",
        "failure_reason",
    ]
    ordering = ["-submitted_at", "-id"]  # newest first; equal times in a stable order
    submitted = to_the_second("submitted_at", "submitted (UTC)")
    started = to_the_second("started_at", "started (UTC)")
    finished = to_the_second("finished_at", "finished (UTC)")
    list_filter = ["status", "ce", "vo"]
    search_fields = ["=id", "external_id", "failure_reason"]
    date_hierarchy = "submitted_at"
    show_full_result_count = False
    list_select_related = ["ce", "vo"]
    readonly_fields = [f.name for f in PilotSubmission._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # pilots are submitted (action, API, CLI, cycles), not typed in

    def has_change_permission(
        self, request: HttpRequest, obj: PilotSubmission | None = None
    ) -> bool:
        return False


@admin.register(PilotReport)
class PilotReportAdmin(admin.ModelAdmin):
    list_display = ["created", "by_status"]
    created = to_the_second("created_at", "created (UTC)")
    date_hierarchy = "created_at"
    readonly_fields = ["created_at", "by_status", "by_ce", "by_vo"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: PilotReport | None = None) -> bool:
        return False
