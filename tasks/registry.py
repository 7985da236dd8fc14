"""Handlers registered by name, with their policy: retry, dead-lettering, locks, time limits.

Apps declare handlers in a `handlers` module, loaded when Django starts:

    @register("pilots.submit_pilot", retry=RetrySpec(policy="none", dead_letter=False),
              locks=lambda data: [MutexLock("pilot", data["ce"])])
    def submit_pilot(ctx: TaskContext) -> dict: ...
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tasks.exceptions import QueueError
from tasks.locks import MutexLock
from tasks.retry import RetrySpec


class UnknownHandler(QueueError):
    http_status = 400


class TaskCancelled(Exception):
    """Raised by TaskContext.check_cancelled() when an operator cancelled the running task."""


@dataclass
class TaskContext:
    task_id: uuid.UUID
    scheduler_id: str
    data: dict[str, Any]
    attempt: int
    is_cancelled: Callable[[], bool] = field(default=lambda: False, repr=False)

    def check_cancelled(self) -> None:
        """Call between steps of long work: raises TaskCancelled once a cancel is requested."""
        if self.is_cancelled():
            raise TaskCancelled(f"task {self.task_id} was cancelled")


@dataclass(frozen=True)
class Handler:
    name: str
    func: Callable[[TaskContext], Any]
    retry: RetrySpec = field(default_factory=RetrySpec)
    locks: Callable[[dict[str, Any]], Iterable[MutexLock]] | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None

    def locks_for(self, data: dict[str, Any]) -> list[MutexLock]:
        return list(self.locks(data)) if self.locks else []


HANDLERS: dict[str, Handler] = {}


def register(
    name: str,
    *,
    retry: RetrySpec | None = None,
    locks: Callable[[dict[str, Any]], Iterable[MutexLock]] | None = None,
    soft_time_limit: float | None = None,
    time_limit: float | None = None,
) -> Callable[[Callable[[TaskContext], Any]], Callable[[TaskContext], Any]]:
    def decorate(func: Callable[[TaskContext], Any]) -> Callable[[TaskContext], Any]:
        HANDLERS[name] = Handler(
            name=name,
            func=func,
            retry=retry or RetrySpec(),
            locks=locks,
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
        )
        return func

    return decorate


def get_handler(name: str) -> Handler:
    try:
        return HANDLERS[name]
    except KeyError:
        known = ", ".join(sorted(HANDLERS)) or "none"
        raise UnknownHandler(f"handler: {name!r} is not registered (known: {known}).") from None
