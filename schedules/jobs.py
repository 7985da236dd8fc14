"""Celery task functions of the schedules app."""

from __future__ import annotations

from celery import shared_task

from schedules import services


@shared_task(name="schedules.orchestrate", ignore_result=True)
def orchestrate() -> dict[str, int]:
    return services.orchestrate()
