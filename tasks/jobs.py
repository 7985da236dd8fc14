"""Celery task functions of the tasks app (housekeeping run by beat). They take ids or
nothing, and call one service."""

from __future__ import annotations

from celery import shared_task

from tasks import services


@shared_task(name="tasks.reap_expired_leases", ignore_result=True)
def reap_expired_leases() -> int:
    return services.tasks_reap_expired()


@shared_task(name="tasks.prune_finished_tasks", ignore_result=True)
def prune_finished_tasks() -> int:
    return services.tasks_prune()
