from __future__ import annotations

from django.apps import AppConfig


class SchedulesConfig(AppConfig):
    name = "schedules"
    verbose_name = "Schedules"

    def ready(self) -> None:
        from scheduler_site import writers
        from schedules import services
        from tasks import services as task_services

        for hooks, hook in [
            (task_services.on_completed_hooks, services.adapt_interval),
            (task_services.on_completed_hooks, services.schedule_task_succeeded),
            (task_services.on_failed_hooks, services.schedule_task_failed),
        ]:
            if hook not in hooks:
                hooks.append(hook)
        writers.register(
            schedule_pause=services.schedule_pause,
            schedule_resume=services.schedule_resume,
            schedule_finish=services.schedule_finish,
        )
