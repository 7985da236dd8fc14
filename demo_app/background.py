"""Django Tasks functions (`@task`, DEP 14), as an app adopting Django's Tasks framework writes
them. With `TASKS = {"default": {"BACKEND": "tasks.django_tasks.SchedulerBackend"}}` their
`.enqueue()` lands in the scheduler's queue named by `queue_name` and runs on its workers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import django

if django.VERSION >= (6, 0):
    from django.tasks import task
else:  # Django 5.2: the django-tasks backport, the same API
    from django_tasks import task


@task()
def multiply(x: float, y: float) -> float:
    return x * y


@task(priority=10, queue_name="reports")
def summary(label: str = "demo") -> dict[str, Any]:
    """What the demo's schedule on the `reports` queue runs every 30 s."""
    return {"label": label, "at": time.time()}


@task()
def fail(message: str = "demo failure") -> None:
    raise ValueError(message)


@task(takes_context=True)
def whoami(context: Any) -> dict[str, Any]:
    """Its own result id and attempt, from the Task context."""
    return {"id": context.task_result.id, "attempt": context.attempt}


@task()
async def asleep(seconds: float = 0.1) -> str:
    """A coroutine: run in the worker through async_to_sync."""
    await asyncio.sleep(seconds)
    return "awake"
