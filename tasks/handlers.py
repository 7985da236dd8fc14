"""Demo handlers: what `make run` shows running, retrying and dead-lettering, and what the
end-to-end tests drive through real Celery workers."""

from __future__ import annotations

import random
import time
from typing import Any

from tasks.locks import MutexLock
from tasks.registry import TaskContext, register
from tasks.retry import RetrySpec


@register("demo.echo", retry=RetrySpec(policy="none", dead_letter=False))
def echo(ctx: TaskContext) -> dict[str, Any]:
    """Returns its data: the smallest thing a worker can do."""
    return {"echo": ctx.data, "attempt": ctx.attempt}


@register(
    "demo.flaky",
    retry=RetrySpec(
        policy="fixed", max_attempts=3, delay_seconds=3, jitter=False, dead_letter=True
    ),
)
def flaky(ctx: TaskContext) -> dict[str, Any]:
    """Fails with probability `fail_rate` (default 0.4): some tasks retry, a few die."""
    time.sleep(float(ctx.data.get("seconds", 0.2)))
    if random.random() < float(ctx.data.get("fail_rate", 0.4)):
        raise RuntimeError(f"demo failure on attempt {ctx.attempt}")
    return {"ok": True, "attempt": ctx.attempt}


@register(
    "demo.sleep",
    retry=RetrySpec(policy="fixed", max_attempts=3, delay_seconds=1, jitter=False),
    soft_time_limit=120,
)
def sleep(ctx: TaskContext) -> dict[str, Any]:
    """Sleeps `seconds` in small steps, checking for cancellation; fails if `fail` is set."""
    deadline = time.monotonic() + float(ctx.data.get("seconds", 1))
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        time.sleep(0.05)
    if ctx.data.get("fail"):
        raise RuntimeError(str(ctx.data["fail"]))
    return {"slept": ctx.data.get("seconds", 1), "attempt": ctx.attempt}


@register(
    "demo.locked",
    retry=RetrySpec(policy="none", dead_letter=False),
    locks=lambda data: [MutexLock("demo", data.get("key", "default"))],
)
def locked(ctx: TaskContext) -> dict[str, Any]:
    """Holds MutexLock("demo", key) for `seconds`; reports when it held it (overlap tests)."""
    started = time.time()
    time.sleep(float(ctx.data.get("seconds", 0.2)))
    return {"key": ctx.data.get("key", "default"), "started": started, "ended": time.time()}
