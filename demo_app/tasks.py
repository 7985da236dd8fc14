"""Plain Celery tasks, as an existing project has them: `@shared_task`s in an app's `tasks`
module (Celery's autodiscovery finds it). The scheduler runs them as `celery:<task name>`
handlers; nothing here knows about it, except that `slow` calls `check_cancelled()`, which does
nothing when the task runs anywhere else (a plain Celery worker, `.delay()`, a direct call)."""

from __future__ import annotations

import random
import time
from typing import Any

from celery import shared_task

from tasks.registry import check_cancelled


@shared_task
def add(x: float, y: float) -> float:
    return x + y


@shared_task(bind=True)
def flaky(self: Any, fail_rate: float = 0.4, seconds: float = 0.2) -> dict[str, Any]:
    """Fails with probability `fail_rate` and asks Celery to retry: under the scheduler, the
    retry is its queue's retry policy (attempts, backoff, then a dead letter)."""
    time.sleep(seconds)
    if random.random() < fail_rate:
        raise self.retry(exc=RuntimeError(f"demo failure on try {self.request.retries + 1}"))
    return {"ok": True, "tries": self.request.retries + 1, "id": self.request.id}


@shared_task
def slow(seconds: float = 5.0, fail: str = "") -> dict[str, Any]:
    """Sleeps `seconds` in small steps, stopping early when an operator cancels it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check_cancelled()
        time.sleep(0.05)
    if fail:
        raise RuntimeError(fail)
    return {"slept": seconds}


@shared_task(soft_time_limit=1)
def overrun(seconds: float = 5.0) -> str:
    """Runs past its one-second soft time limit (unless `seconds` < 1)."""
    time.sleep(seconds)
    return "finished in time"
