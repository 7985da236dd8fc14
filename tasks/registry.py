"""Handlers registered by name, with their policy: retry, dead-lettering, locks, time limits.

Apps declare handlers in a `handlers` module, loaded when Django starts:

    @register("pilots.submit_pilot", retry=RetrySpec(policy="none", dead_letter=False),
              locks=lambda data: [MutexLock("pilot", data["ce"])])
    def submit_pilot(ctx: TaskContext) -> dict: ...

Some names are not registered but resolved when looked up, by the resolver of their prefix:
`celery:<task name>` is any task the Celery app knows (tasks.celery_handlers). A lookup in
HANDLERS (`get`, `in`, `[]`) resolves them, so every caller sees one registry.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from tasks.exceptions import QueueError
from tasks.locks import MutexLock, Semaphore
from tasks.models import Scheduler, SchedulerKind
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
    worker: str = ""

    def check_cancelled(self) -> None:
        """Call between steps of long work: raises TaskCancelled once a cancel is requested."""
        if self.is_cancelled():
            raise TaskCancelled(f"task {self.task_id} was cancelled")


_CURRENT: ContextVar[TaskContext | None] = ContextVar("scheduler_task_context", default=None)


@contextlib.contextmanager
def running(context: TaskContext) -> Iterator[None]:
    """While a worker runs a handler: code that does not get the context passed (a Celery task
    run as a `celery:` handler, a Django Tasks function) finds it with current_context()."""
    token = _CURRENT.set(context)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_context() -> TaskContext | None:
    """The context of the task this thread runs for a worker, or None outside one."""
    return _CURRENT.get()


def check_cancelled() -> None:
    """TaskContext.check_cancelled() of the running task; does nothing outside a worker's
    task, so a Celery task may call it and still run anywhere else."""
    context = _CURRENT.get()
    if context is not None:
        context.check_cancelled()


@dataclass(frozen=True)
class Handler:
    name: str
    func: Callable[[TaskContext], Any]
    # None: the policy of the task's queue (what `celery:` handlers follow).
    retry: RetrySpec | None = field(default_factory=RetrySpec)
    locks: Callable[[dict[str, Any]], Iterable[MutexLock | Semaphore]] | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None
    # Checks a task's data at push (raises InvalidRequest naming the problem): a task that
    # could never run is refused with a 400, not failed on a worker later.
    validate: Callable[[dict[str, Any]], None] | None = None
    # How a failure of this handler reads in the task's `error` (default "Type: message").
    describe_error: Callable[[BaseException], str] | None = None

    def locks_for(self, data: dict[str, Any]) -> list[MutexLock | Semaphore]:
        return list(self.locks(data)) if self.locks else []


# A prefix (before ":") -> a function that makes the Handler of the rest of the name, or
# raises UnknownHandler saying why there is none.
RESOLVERS: dict[str, Callable[[str], Handler]] = {}


class HandlerRegistry(dict[str, Handler]):
    """The registered handlers by name; a lookup also resolves names with a resolver's prefix."""

    def resolve(self, name: str) -> Handler:
        handler = super().get(name)
        if handler is not None:
            return handler
        prefix, colon, rest = name.partition(":") if isinstance(name, str) else ("", "", "")
        resolver = RESOLVERS.get(prefix) if colon and rest else None
        if resolver is None:
            known = ", ".join(sorted(self)) or "none"
            raise UnknownHandler(f"handler: {name!r} is not registered (known: {known}).")
        return resolver(rest)

    def get(self, name: str, default: Handler | None = None) -> Handler | None:  # type: ignore[override]
        try:
            return self.resolve(name)
        except UnknownHandler:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __getitem__(self, name: str) -> Handler:
        try:
            return self.resolve(name)
        except UnknownHandler:
            raise KeyError(name) from None


HANDLERS: HandlerRegistry = HandlerRegistry()


def register(
    name: str,
    *,
    retry: RetrySpec | None = None,
    locks: Callable[[dict[str, Any]], Iterable[MutexLock | Semaphore]] | None = None,
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


def check_task_data(scheduler: Scheduler, data: dict[str, Any]) -> None:
    """Refuse (InvalidRequest, 400 on `data`) what the queue's handler says it could never run,
    e.g. arguments that do not fit a `celery:` handler's Celery task: at push, and when a
    schedule is saved, rather than as a failed attempt later."""
    if scheduler.kind != SchedulerKind.CELERY or not scheduler.handler:
        return
    handler = HANDLERS.get(scheduler.handler)
    if handler is not None and handler.validate is not None:
        handler.validate(data)


def get_handler(name: str) -> Handler:
    """The handler of `name`; UnknownHandler (400) says why there is none."""
    return HANDLERS.resolve(name)


def handler_problem(*, name: str) -> str:
    """Why `name` names no handler ("" when it does): the check Scheduler.clean() runs on every
    write of a scheduler (the model reaches it through scheduler_site.writers, as it cannot
    import this module, which imports the models)."""
    try:  # a registered name, or one its prefix resolves (`celery:<task name>`)
        get_handler(name)
    except UnknownHandler as exc:
        return exc.message.removeprefix("handler: ")
    return ""
