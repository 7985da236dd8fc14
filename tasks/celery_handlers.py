"""`celery:<task name>` handlers: any task registered with the Celery app runs as a handler.

A celery-kind scheduler whose handler is `celery:proj.tasks.add` runs `proj.tasks.add` (a
`@shared_task` of an installed app, or one of Celery's own such as `celery.accumulate`) for
each of its tasks, with data `{"args": [...], "kwargs": {...}}`. The call happens inside the
worker's own path (tasks.execution): claimed by compare-and-swap with a lease token, the lease
heartbeated, the queue's retry policy and dead-lettering, Celery's time limits (sent with the
message, as for any handler). The task's body runs synchronously in the worker, under a request
context of its own, as Celery's tracer would run it but without a second message: `self.retry()`
(and `autoretry_for`) raise `Retry` there instead of sending the task again, and a `Retry` is a
failed attempt that our retry policy handles. The return value is the result when JSON can hold
it, else its `repr`.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from celery import Task as CeleryTask
from celery._state import _task_stack
from celery.app.trace import task_has_custom
from celery.exceptions import Ignore, Retry

from scheduler_site.celery import app
from tasks.exceptions import InvalidRequest
from tasks.registry import RESOLVERS, Handler, TaskContext, UnknownHandler

PREFIX = "celery"
# The scheduler's own Celery jobs (dispatch, reaper, the worker's run_task) are not work to
# queue: run as handlers they would run the machinery inside itself.
SYSTEM_JOB_MODULES = frozenset({"tasks.jobs", "schedules.jobs", "pilots.jobs"})
DATA_SHAPE = '{"args": [...], "kwargs": {...}}'

_imported = False


def celery_task(name: str) -> CeleryTask:
    """The task registered under `name` with the Celery app; UnknownHandler (400) if none."""
    global _imported
    if name not in app.tasks and not _imported:
        # Outside a worker nothing has imported the apps' task modules yet: autodiscovery
        # runs when the loader imports its default modules (a worker does so at start).
        _imported = True
        app.loader.import_default_modules()
    task = app.tasks.get(name)
    if task is None:
        raise UnknownHandler(
            f"handler: 'celery:{name}': no task {name!r} is registered with the Celery app "
            "(a @shared_task in the tasks or jobs module of an installed app, or one of "
            "Celery's own such as celery.accumulate)."
        )
    if task.__module__ in SYSTEM_JOB_MODULES:
        raise UnknownHandler(
            f"handler: 'celery:{name}': {name!r} is one of the scheduler's own jobs, not work "
            "to queue."
        )
    return task


def resolve(name: str) -> Handler:
    task = celery_task(name)
    return Handler(
        name=f"{PREFIX}:{name}",
        func=partial(call, task),
        retry=None,  # the queue's policy: a Celery task has none of ours
        soft_time_limit=task.soft_time_limit,
        time_limit=task.time_limit,
        validate=partial(call_arguments, task),
        describe_error=describe_error,
    )


def call_arguments(task: CeleryTask, data: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The task's positional and keyword arguments from a task's data, checked against its
    signature as Celery's own apply_async checks them; InvalidRequest (400 on `data`) if not."""
    if not isinstance(data, dict):
        raise InvalidRequest("data", f"must be an object: a Celery task's data is {DATA_SHAPE}.")
    unknown = sorted(set(data) - {"args", "kwargs"})
    if unknown:
        raise InvalidRequest(
            "data", f"unknown keys {unknown}: a Celery task's data is {DATA_SHAPE}."
        )
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    if not isinstance(args, list):
        raise InvalidRequest("data", f"args must be a list: a Celery task's data is {DATA_SHAPE}.")
    if not isinstance(kwargs, dict):
        raise InvalidRequest(
            "data", f"kwargs must be an object: a Celery task's data is {DATA_SHAPE}."
        )
    check = getattr(task, "__header__", None)  # a function with the task's signature
    if check is not None and task.typing:
        try:
            check(*args, **kwargs)
        except TypeError as exc:
            raise InvalidRequest("data", f"the arguments do not fit {task.name}: {exc}.") from None
    return args, kwargs


def call(task: CeleryTask, ctx: TaskContext) -> Any:
    """Run the task's body here, now, as its own request: `self.request.id` is our task's id,
    `self.request.retries` the attempts before this one."""
    args, kwargs = call_arguments(task, ctx.data)
    # is_eager: self.retry() raises Retry rather than sending the task again (Celery's eager
    # mode); called_directly False: it gets that far instead of re-raising the bare error.
    task.push_request(
        id=str(ctx.task_id),
        args=args,
        kwargs=kwargs,
        retries=max(ctx.attempt - 1, 0),
        is_eager=True,
        called_directly=False,
        hostname=ctx.worker or None,
        delivery_info={"is_eager": True, "scheduler": ctx.scheduler_id},
    )
    _task_stack.push(task)  # celery.current_task, as inside Celery's tracer
    try:
        run = task if task_has_custom(task, "__call__") else task.run
        value = run(*args, **kwargs)
    except Ignore:
        return None  # the task asked for no state to be recorded: done, with no result
    finally:
        _task_stack.pop()
        task.pop_request()
    return json_safe(value)


def json_safe(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists), or its repr when JSON cannot hold
    it: not serialisable, NaN or infinity, or a NUL character (PostgreSQL refuses them)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    if "\\u0000" in text:
        return repr(value)
    return json.loads(text)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, Retry):
        reason = exc.excs or exc.message
        return "Retry requested by the task" + (f": {reason}" if reason else "")
    return f"{type(exc).__name__}: {exc}"


RESOLVERS[PREFIX] = resolve
