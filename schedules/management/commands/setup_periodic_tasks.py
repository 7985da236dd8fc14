from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from scheduler_site.periodic import PeriodicJob, system_jobs


class Command(BaseCommand):
    help = (
        "Create or update, idempotently, the django-celery-beat PeriodicTask rows of the "
        "system's jobs (orchestrator tick, lease reaper, pruning, ...). An operator's choice to "
        "disable one in the admin is kept. Run at every deployment; `make run` runs it."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            for job in system_jobs():
                self.stdout.write(f"{self._ensure(job):9} {job.name} -> {job.task}")

    @staticmethod
    def _schedule_fields(job: PeriodicJob) -> dict[str, Any]:
        if job.every_seconds:
            interval, _ = IntervalSchedule.objects.get_or_create(
                every=job.every_seconds, period=IntervalSchedule.SECONDS
            )
            return {"interval": interval, "crontab": None}
        minute, hour, day, month, weekday = job.crontab.split()
        crontab, _ = CrontabSchedule.objects.get_or_create(
            minute=minute,
            hour=hour,
            day_of_month=day,
            month_of_year=month,
            day_of_week=weekday,
            timezone="UTC",
        )
        return {"interval": None, "crontab": crontab}

    def _ensure(self, job: PeriodicJob) -> str:
        wanted = {
            "task": job.task,
            "kwargs": json.dumps(job.kwargs, sort_keys=True),
            "description": job.description,
            # Visible in the admin; the router sends these to the same queue anyway.
            "queue": settings.CELERY_SYSTEM_QUEUE,
            **self._schedule_fields(job),
        }
        existing = PeriodicTask.objects.filter(name=job.name).first()
        if existing is None:
            PeriodicTask.objects.create(name=job.name, **wanted)
            return "created"
        changed = [name for name, value in wanted.items() if getattr(existing, name) != value]
        if not changed:
            return "unchanged"
        for name in changed:
            setattr(existing, name, wanted[name])
        # save() row by row (not QuerySet.update) so beat's change signal fires.
        existing.save()
        return "updated"
