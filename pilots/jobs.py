"""Celery task functions of the pilots app: beat starts a cycle, which queues one task per
enabled VO (or one, for class-level jobs) on the cycle's celery queue."""

from __future__ import annotations

import logging

from celery import shared_task

from pilots.queues import CYCLES, start_cycle

logger = logging.getLogger(__name__)


@shared_task(name="pilots.start_cycle", ignore_result=True)
def start_cycle_job(cycle: str) -> list[str]:
    if cycle not in CYCLES:
        logger.error("unknown pilot cycle %r", cycle)
        return []
    return start_cycle(cycle)
