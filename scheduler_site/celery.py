"""The Celery app. The scheduler's own Celery task functions live in each of its apps' `jobs`
module (not `tasks`, which is the name of a Django app here), so autodiscovery looks for
`jobs`; it also looks for Celery's usual `tasks` module in every installed app, so that the
`@shared_task`s of your own apps are registered and can run as `celery:<task name>` handlers
(there is no `tasks.tasks`: the tasks app holds none)."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    beat_init,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from kombu.transport import TRANSPORT_ALIASES

from scheduler_site import log_context, tracing, worker_queues

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")

# `filesystem://` means our atomic-put variant of kombu's transport (see kombu_filesystem).
TRANSPORT_ALIASES["filesystem"] = "scheduler_site.kombu_filesystem:Transport"
# `redis://` and `rediss://`: kombu's Redis transport with one client kept per channel rather
# than one built per publish and per ack (see kombu_redis).
TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = "scheduler_site.kombu_redis:Transport"

app = Celery("scheduler_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(related_name="jobs")
app.autodiscover_tasks(related_name="tasks")
worker_queues.install(app)


@app.on_after_configure.connect
def _ensure_broker_folder(sender: Celery, **_: object) -> None:
    # kombu's filesystem transport does not create its folder.
    from django.conf import settings

    if settings.CELERY_BROKER_URL.startswith("filesystem://"):
        (settings.CELERY_BROKER_DIR / "control").mkdir(parents=True, exist_ok=True)


@task_prerun.connect
def _recycle_old_connections(**_: object) -> None:
    # Connections are kept across tasks (CELERY_DB_REUSE_MAX). Drop one that saw an error or is
    # past CONN_MAX_AGE, as Django does between requests, but without Django's per-request
    # health check: a `SELECT 1` round trip before every task cost a tenth of a no-op task's
    # throughput. A connection that broke while idle is caught where a task first uses it: the
    # worker's claim reconnects and tries once more (tasks.execution).
    import time

    from django.db import connections

    for conn in connections.all(initialized_only=True):
        if conn.connection is None:
            continue
        expired = conn.close_at is not None and time.monotonic() >= conn.close_at
        # A task that left autocommit off (or a transaction open) would make every later
        # one-statement claim and report run in a transaction that never commits.
        left_open = conn.get_autocommit() != conn.settings_dict["AUTOCOMMIT"]
        if conn.errors_occurred or expired or left_open:
            conn.close_if_unusable_or_obsolete()


@task_prerun.connect
def _bind_log_fields(task_id: str, task: Any, args: tuple[Any, ...] = (), **_: object) -> None:
    # Every record the job logs carries what it is about (LOG_FORMAT=json shows them).
    fields: dict[str, Any] = {"celery_task": task.name, "celery_task_id": task_id}
    if task.name == "tasks.run_task" and len(args) >= 2:
        fields |= {"task_id": str(args[0]), "attempt": int(args[1])}
    # The dispatcher sends the scheduler in a message header (tasks.dispatch._send); a batch
    # binds each task's id and attempt as it runs it (tasks.execution_batch).
    scheduler = getattr(task.request, "scheduler", None)
    if scheduler and task.name in ("tasks.run_task", "tasks.run_tasks"):
        fields["scheduler"] = scheduler
    task.request.log_token = log_context.bind(**fields)


@task_postrun.connect
def _unbind_log_fields(task: Any, **_: object) -> None:
    token = getattr(task.request, "log_token", None)
    if token is not None:
        log_context.unbind(token)


@after_setup_logger.connect
def _celery_logs_as_json(logger: logging.Logger, **_: object) -> None:
    # Celery gives its worker and beat their own root handler and text format; with
    # LOG_FORMAT=json their lines (task received, succeeded, beat's sends) are JSON too.
    from django.conf import settings

    if settings.LOG_FORMAT == "json":
        log_context.use_json(logger)


# Tracing (SCHEDULER_OTEL=1) starts once per process that runs work: in each prefork child
# (a provider's export thread does not survive the fork, so never in the parent), in the
# worker itself for the solo and thread pools, and in beat.
@worker_init.connect
def _trace_worker(sender: Any, **_: object) -> None:
    pool = sender.pool_cls  # a name ("solo") or a class here, before Celery resolves it
    if "prefork" not in (pool if isinstance(pool, str) else pool.__module__):
        tracing.setup("worker")


@worker_process_init.connect
def _trace_worker_process(**_: object) -> None:
    tracing.setup("worker")


@beat_init.connect
def _trace_beat(**_: object) -> None:
    tracing.setup("beat")


@worker_process_shutdown.connect
@worker_shutdown.connect
def _flush_traces(**_: object) -> None:
    tracing.teardown()  # exports the spans still batched
