from __future__ import annotations

from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = "Task queues"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from tasks.roles import ensure_roles

        post_migrate.connect(ensure_roles, sender=self)
