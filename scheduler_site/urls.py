from __future__ import annotations

from django.contrib import admin
from django.urls import URLPattern, include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from pilots.api import ComputeElementViewSet, PilotViewSet, VOViewSet
from scheduler_site.dashboard import dashboard, queue_page
from scheduler_site.health import health_view, healthz
from scheduler_site.metrics import metrics_view
from schedules.api import ScheduleViewSet
from tasks import api_lean
from tasks.api import (
    SchedulerViewSet,
    TaskViewSet,
    WorkerViewSet,
    batch_report_answer,
    pop_answer,
    push_answer,
    report_answer,
)

router = DefaultRouter()
router.register("schedulers", SchedulerViewSet, basename="scheduler")
router.register("tasks", TaskViewSet, basename="task")
router.register("schedules", ScheduleViewSet, basename="schedule")
router.register("vos", VOViewSet, basename="vo")
router.register("compute-elements", ComputeElementViewSet, basename="compute-element")
router.register("pilots", PilotViewSet, basename="pilot")
router.register("workers", WorkerViewSet, basename="worker")

# The hot endpoints' lean views (tasks/api_lean.py), in front of the router's routes they
# fall back on, on the same paths.
_LEAN = {
    "scheduler-pop": (pop_answer, "POST"),
    "scheduler-push": (push_answer, "POST"),
    "task-detail": (report_answer, "PATCH"),
    "task-report": (batch_report_answer, "POST"),
}


def _lean_routes(routes: list[URLPattern]) -> list[URLPattern]:
    lean = []
    for route in routes:
        if route.name in _LEAN and "(?P<format>" not in route.pattern.regex.pattern:
            answer, method = _LEAN[route.name]
            view = api_lean.lean(route.callback, answer, method=method)
            lean.append(re_path(route.pattern.regex.pattern, view))
    return lean


handler404 = "scheduler_site.api_errors.not_found"

urlpatterns = [
    # First: the runners' calls, the most frequent requests, match without trying the others
    # (their paths are the router's, which none of the patterns below match).
    path("api/", include(_lean_routes(router.urls))),
    path("", dashboard, name="dashboard"),
    path("queues/<str:scheduler_id>/", queue_page, name="queue-page"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/health/", health_view, name="health"),
    path("api/", include(router.urls)),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
]
