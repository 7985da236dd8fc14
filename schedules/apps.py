from __future__ import annotations

from django.apps import AppConfig


class SchedulesConfig(AppConfig):
    name = "schedules"
    verbose_name = "Schedules"

    def ready(self) -> None:
        from schedules.services import adapt_interval
        from tasks import services as task_services

        if adapt_interval not in task_services.on_completed_hooks:
            task_services.on_completed_hooks.append(adapt_interval)
