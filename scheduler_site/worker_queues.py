"""`celery worker --all-queues`: besides what it consumes anyway (the default and system
queues, or its -Q), the worker consumes every celery-kind scheduler's `celery_queue`, and
re-reads them every QUEUE_REFRESH_SECONDS so that a queue created while it runs is served too.

For one machine (`make run`'s worker): one pool serves everything. A production pool is
started with `-Q` instead, so that a queue of slow handlers has workers of its own.
"""

from __future__ import annotations

import logging
from typing import Any

import click
from celery import Celery, bootsteps
from django.apps import apps
from django.db import connection

logger = logging.getLogger(__name__)

QUEUE_REFRESH_SECONDS = 10.0


def scheduler_queues() -> set[str]:
    """The Celery queues the celery-kind schedulers send to."""
    scheduler = apps.get_model("tasks", "Scheduler")
    names = scheduler.objects.filter(kind="celery").values_list("celery_queue", flat=True)
    return set(names.distinct())


class SchedulerQueues(bootsteps.StartStopStep):
    """A consumer bootstep; on only with --all-queues."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, all_queues: bool = False, **kwargs: Any) -> None:
        self.enabled = bool(all_queues)
        self.timer_entry: Any = None
        super().__init__(parent, **kwargs)

    def start(self, consumer: Any) -> None:
        self._follow(consumer)
        # Timer callbacks may run on the timer's own thread: the consumer's loop does the
        # work (call_soon), as it does for the `add_consumer` remote-control command.
        self.timer_entry = consumer.timer.call_repeatedly(
            QUEUE_REFRESH_SECONDS, consumer.call_soon, (self._follow, consumer)
        )

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    shutdown = stop

    def _follow(self, consumer: Any) -> None:
        try:
            wanted = scheduler_queues()
        except Exception:  # the database may be away for a while: try again next round
            logger.exception("could not read the schedulers' Celery queues")
            return
        finally:
            # The worker's main process runs no task (prefork): keep no idle connection open.
            connection.close()
        for name in sorted(wanted):
            if not consumer.task_consumer.consuming_from(name):
                consumer.add_task_queue(name)
                logger.info("now consuming Celery queue %s (a scheduler's celery_queue)", name)


def install(app: Celery) -> None:
    app.user_options["worker"].add(
        click.Option(
            ["--all-queues"],
            is_flag=True,
            default=False,
            help="Also consume every celery-kind scheduler's celery_queue, re-read every "
            f"{QUEUE_REFRESH_SECONDS:.0f} s (one pool for everything, as `make run`).",
        )
    )
    app.steps["consumer"].add(SchedulerQueues)
