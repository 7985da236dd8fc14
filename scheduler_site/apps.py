"""The admin site: Django's, with the system's own sections last and named for what they are."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.http import HttpRequest

# App label -> the name its section shows, in the order the sections come last.
SYSTEM_SECTIONS = {
    "django_celery_beat": "System: beat's periodic jobs",
    "knox": "System: API tokens",
    "axes": "System: admin login lockouts",
    "auth": "System: accounts and groups",
}


class SchedulerAdminSite(admin.AdminSite):
    site_header = "Scheduler administration"
    site_title = "Scheduler admin"

    def get_app_list(self, request: HttpRequest, app_label: str | None = None) -> list[Any]:
        """One section for schedules (ours); beat's periodic tasks, crontabs and intervals,
        which are the system's clock and not the operator's schedules, under "System"."""
        apps = super().get_app_list(request, app_label)
        for app in apps:
            app["name"] = SYSTEM_SECTIONS.get(app["app_label"], app["name"])
        order = list(SYSTEM_SECTIONS)
        return sorted(
            apps, key=lambda a: order.index(a["app_label"]) + 1 if a["app_label"] in order else 0
        )


class SchedulerAdminConfig(AdminConfig):
    default_site = "scheduler_site.apps.SchedulerAdminSite"
