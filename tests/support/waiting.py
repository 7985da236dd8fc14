"""Waiting for the system to get somewhere, moving it along as beat would meanwhile."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tasks import dispatch, housekeeping
from tasks.models import Task


def beat() -> None:
    """One round of the periodic jobs that move tasks along: what beat would run."""
    housekeeping.tasks_reap_expired()
    dispatch.dispatch_all()


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 60, message: str = "condition"
) -> Any:
    """Poll (running the periodic jobs as beat would) until `condition()` is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        beat()
        time.sleep(0.2)
    statuses = list(Task.objects.values_list("status", "attempts", "error"))
    raise AssertionError(f"timed out waiting for {message}; tasks: {statuses[:20]}")
