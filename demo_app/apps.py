from __future__ import annotations

from django.apps import AppConfig


class DemoAppConfig(AppConfig):
    """An ordinary Django app with ordinary Celery tasks (`tasks.py`) and Django Tasks
    functions (`background.py`), written as anyone would write them: what `make run` runs as
    `celery:` handlers and through the Django Tasks backend, and what the end-to-end tests
    drive through real workers."""

    name = "demo_app"
    verbose_name = "Demo app (bring your own work)"
