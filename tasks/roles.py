"""The two roles of the brief as Django groups, kept in step with the permissions on migrate.

operators manage everything; runners see queues and tasks, pop, heartbeat and report.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group, Permission

OPERATORS = "operators"
RUNNERS = "runners"

OPERATOR_APPS = ("tasks", "schedules", "pilots", "django_celery_beat")
RUNNER_PERMISSIONS = (
    ("tasks", "view_scheduler"),
    ("tasks", "view_task"),
    ("tasks", "view_taskevent"),
    ("tasks", "pop_task"),
    ("tasks", "report_task"),
)


def ensure_roles(**_: Any) -> None:
    operators, _created = Group.objects.get_or_create(name=OPERATORS)
    operators.permissions.set(Permission.objects.filter(content_type__app_label__in=OPERATOR_APPS))
    runners, _created = Group.objects.get_or_create(name=RUNNERS)
    runner_perms = [
        Permission.objects.filter(content_type__app_label=app, codename=codename).first()
        for app, codename in RUNNER_PERMISSIONS
    ]
    runners.permissions.set([perm for perm in runner_perms if perm is not None])
