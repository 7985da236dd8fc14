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

        from django.db.backends.signals import connection_created

        from scheduler_site.databases import use_generic_plans

        connection_created.connect(use_generic_plans, dispatch_uid="tasks.use_generic_plans")

        from django.utils.module_loading import autodiscover_modules

        from scheduler_site import writers

        # Imported for what they register: the `celery:` resolver, the Django Tasks handler,
        # the worker registry's Celery signals.
        from tasks import (  # noqa: F401
            celery_handlers,
            dispatch,
            django_tasks,
            registry,
            services,
            workers,
        )

        # Every app's `handlers` module registers its handlers by name; `celery:<task name>`
        # names resolve to the Celery app's tasks (tasks.celery_handlers); `django_tasks.call`
        # runs Django Tasks functions (tasks.django_tasks).
        autodiscover_modules("handlers")
        dispatch.connect()
        # What the models' state-machine methods (Task.complete(), …) call.
        writers.register(
            task_start=services.task_start,
            task_complete=services.task_complete,
            task_fail=services.task_fail,
            task_cancel=services.task_cancel,
            task_requeue=services.task_requeue,
            # Not a writer but the same inversion: Scheduler.clean()'s handler check.
            handler_problem=registry.handler_problem,
        )
