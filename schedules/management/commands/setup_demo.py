from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser, Group
from django.core.management.base import BaseCommand, CommandParser

from pilots.models import ComputeElement, VirtualOrganisation
from schedules import services as schedule_services
from schedules.models import Schedule
from tasks import accounts
from tasks import services as task_services
from tasks.models import Scheduler
from tasks.roles import RUNNERS

DEMO_QUEUES: list[dict[str, Any]] = [
    {
        "id": "demo-flaky",
        "kind": "celery",
        "handler": "demo.flaky",
        "description": "Demo: a handler that fails 40% of the time; 3 attempts, then DEAD.",
    },
    {
        "id": "demo-celery-add",
        "kind": "celery",
        "handler": "celery:demo_app.tasks.add",
        "description": "Demo: a plain Celery @shared_task (demo_app.tasks.add) run as a handler.",
    },
    {
        "id": "demo-celery-flaky",
        "kind": "celery",
        "handler": "celery:demo_app.tasks.flaky",
        "description": "Demo: a @shared_task that calls self.retry(): our retries, then DEAD.",
        "retry_policy": "fixed",
        "retry_delay_seconds": 3,
        "retry_jitter": False,
    },
    {
        "id": "reports",
        "kind": "celery",
        "handler": "django_tasks.call",
        "description": "Demo: the queue of Django Tasks functions with queue_name='reports'.",
    },
    {
        "id": "demo-pull",
        "kind": "pull",
        "description": "Demo: popped over REST by the demo pull runner (Procfile).",
        "retry_policy": "fixed",
        "retry_delay_seconds": 5,
    },
]
DEMO_SCHEDULES = [
    ("demo-flaky", f"flaky-{n}", {"interval_seconds": 10 + 5 * n, "data": {"n": n, "seconds": 0.5}})
    for n in range(6)
] + [
    ("demo-celery-add", "add-every-20s", {"interval_seconds": 20, "data": {"args": [2, 3]}}),
    (
        "demo-celery-flaky",
        "celery-flaky-every-10s",
        {"interval_seconds": 10, "data": {"kwargs": {"fail_rate": 0.4, "seconds": 0.5}}},
    ),
    (
        "reports",
        "summary-every-30s",
        {
            "interval_seconds": 30,
            "data": {"task": "demo_app.background.summary", "kwargs": {"label": "demo"}},
        },
    ),
    ("demo-pull", "pull-every-15s", {"interval_seconds": 15, "data": {"hello": "runner"}}),
    ("demo-pull", "pull-every-minute", {"cron": "* * * * *", "data": {"hello": "cron"}}),
]

# Two VOs and four simulated CEs: pilots flow, some fail, one CE is shared by both VOs.
DEMO_CES = [
    ("ce-cern", 6, 0.95, ["lhcb", "atlas"]),
    ("ce-nikhef", 4, 0.9, ["lhcb"]),
    ("ce-ral", 3, 0.7, ["atlas"]),
    ("ce-flaky", 2, 0.4, ["lhcb", "atlas"]),
]


class Command(BaseCommand):
    help = (
        "Create, idempotently, the demo that `make run` shows: a celery queue whose flaky "
        "handler runs, retries and dead-letters, queues running demo_app's plain Celery tasks "
        "(celery:<task> handlers) and a Django Tasks function, a pull queue served by the demo "
        "pull runner, schedules feeding them, the runner's account, limited to demo-pull (its "
        "token in var/demo-runner.token, mode 0600, kept while it is valid), "
        "and two VOs with four simulated Compute Elements for the pilot cycles."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--token-file", default=str(settings.VAR_DIR / "demo-runner.token"))

    def handle(self, *args: Any, token_file: str, **options: Any) -> None:
        for queue in DEMO_QUEUES:
            fields = {k: v for k, v in queue.items() if k != "id"}
            if not Scheduler.objects.filter(id=queue["id"]).exists():
                task_services.scheduler_create(id=queue["id"], **fields)
                self.stdout.write(f"created queue {queue['id']}")
        for scheduler_id, hash_, fields in DEMO_SCHEDULES:
            if not Schedule.objects.filter(scheduler_id=scheduler_id, hash=hash_).exists():
                schedule_services.schedule_create(
                    scheduler_id=scheduler_id, hash=hash_, name=hash_, actor="demo", **fields
                )
                self.stdout.write(f"created schedule {scheduler_id}/{hash_}")
        self._pilots_demo()
        user, _ = get_user_model().objects.get_or_create(username="demo-runner")
        if user.has_usable_password():
            user.set_unusable_password()
            user.save(update_fields=["password"])
        user.groups.add(Group.objects.get(name=RUNNERS))
        accounts.runner_grants_set(user=user, scheduler_ids=["demo-pull"])
        self._runner_token(user, Path(token_file))
        self.stdout.write(f"demo ready (runner token in {token_file})")

    def _runner_token(self, user: AbstractUser, token_file: Path) -> None:
        """Keep the token file while its key is valid; else revoke the account's tokens (only
        the file ever held them) and write a new one. The key exists only in that file."""
        if token_file.is_file():
            key = token_file.read_text(encoding="utf-8").strip()
            if key and accounts.token_matches(user=user, key=key):
                return
        accounts.token_revoke(username=user.get_username())
        _token, key = accounts.token_create(user=user)
        token_file.unlink(missing_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(key)

    def _pilots_demo(self) -> None:
        vos = {
            name: VirtualOrganisation.objects.get_or_create(name=name)[0]
            for name in ("lhcb", "atlas")
        }
        for name, capacity, reliability, served in DEMO_CES:
            ce, created = ComputeElement.objects.get_or_create(
                name=name,
                defaults={
                    "capacity": capacity,
                    "reliability": reliability,
                    "backend_settings": {"start_after_seconds": 5, "run_seconds": 25},
                },
            )
            if created:
                ce.vos.set([vos[vo] for vo in served])
                self.stdout.write(f"created CE {name}")
