from __future__ import annotations

from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = "Task queues"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from tasks.roles import ensure_roles

        # After every app, not only this one: the permissions of apps migrated after tasks
        # (schedules, pilots) exist only once their own post_migrate has run.
        post_migrate.connect(ensure_roles, dispatch_uid="tasks.ensure_roles")

        from django.utils.module_loading import autodiscover_modules

        from scheduler_site import writers
        from tasks import dispatch, services, workers  # noqa: F401  (workers: its Celery signals)

        # Every app's `handlers` module registers its handlers by name.
        autodiscover_modules("handlers")
        dispatch.connect()
        # What the models' state-machine methods (Task.complete(), …) call.
        writers.register(
            task_start=services.task_start,
            task_complete=services.task_complete,
            task_fail=services.task_fail,
            task_cancel=services.task_cancel,
            task_requeue=services.task_requeue,
        )
