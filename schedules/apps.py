from __future__ import annotations

from django.apps import AppConfig


class SchedulesConfig(AppConfig):
    name = "schedules"
    verbose_name = "Schedules"

    def ready(self) -> None:
        from scheduler_site import writers
        from schedules import services
        from tasks import services as task_services

        if services.adapt_interval not in task_services.on_completed_hooks:
            task_services.on_completed_hooks.append(services.adapt_interval)
        writers.register(
            schedule_pause=services.schedule_pause,
            schedule_resume=services.schedule_resume,
            schedule_finish=services.schedule_finish,
        )
