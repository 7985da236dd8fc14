"""The Celery app. Celery task functions live in each app's `jobs` module (not `tasks`, which
is the name of a Django app here), so autodiscovery looks for `jobs`."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import task_prerun
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")

# `filesystem://` means our atomic-put variant of kombu's transport (see kombu_filesystem).
TRANSPORT_ALIASES["filesystem"] = "scheduler_site.kombu_filesystem:Transport"

app = Celery("scheduler_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(related_name="jobs")


@app.on_after_configure.connect
def _ensure_broker_folder(sender: Celery, **_: object) -> None:
    # kombu's filesystem transport does not create its folder.
    from django.conf import settings

    if settings.CELERY_BROKER_URL.startswith("filesystem://"):
        (settings.CELERY_BROKER_DIR / "control").mkdir(parents=True, exist_ok=True)


@task_prerun.connect
def _recycle_old_connections(**_: object) -> None:
    # Connections are reused across tasks (CELERY_DB_REUSE_MAX); drop broken or expired ones
    # the way Django does between requests.
    from django.db import close_old_connections

    close_old_connections()
