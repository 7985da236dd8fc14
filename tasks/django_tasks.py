"""A Django Tasks backend (DEP 14): `@task` functions' `.enqueue()` lands in this scheduler's
queue and runs on its Celery workers, with leases, retries and dead letters.

    TASKS = {"default": {"BACKEND": "tasks.django_tasks.SchedulerBackend",
                         "QUEUES": [],  # any queue name (each is a scheduler of that id)
                         "OPTIONS": {"CREATE_SCHEDULERS": True}}}

A task's `queue_name` is the id of a celery-kind scheduler whose handler is `django_tasks.call`
(created on first use, or refused, per CREATE_SCHEDULERS); its `priority` (-100..100, higher
first) is our priority negated (lower first); `run_after` is `not_before`. The worker's handler
imports the function by its module path and calls it (with a TaskContext if `takes_context`).
`get_result(id)` reads our task: status, return value, errors (one per failed attempt), worker
ids (one per attempt). Works on the `django-tasks` backport (Django 5.2) and, unchanged, on
Django 6's `django.tasks`. The semantics that differ are in docs/migration.md.
"""

from __future__ import annotations

import logging
import re
import uuid
from functools import partial
from typing import Any

import django
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.module_loading import import_string

from tasks import services
from tasks.exceptions import InvalidRequest
from tasks.models import (
    FINAL_STATUSES,
    Scheduler,
    SchedulerKind,
    TaskEvent,
    TaskStatus,
    scheduler_id_validator,
)
from tasks.models import Task as QueuedTask
from tasks.registry import HANDLERS, Handler, TaskContext
from tasks.serializers import SCHEDULER_SETTABLE

if django.VERSION >= (6, 0):
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import (
        TASK_MAX_PRIORITY,
        TASK_MIN_PRIORITY,
        Task,
        TaskError,
        TaskResult,
        TaskResultStatus,
    )
    from django.tasks.base import TaskContext as DjangoTaskContext
    from django.tasks.exceptions import InvalidTask as InvalidTaskError
    from django.tasks.exceptions import TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
else:  # the django-tasks backport: the same API under another package
    from django_tasks.backends.base import BaseTaskBackend
    from django_tasks.base import (
        TASK_MAX_PRIORITY,
        TASK_MIN_PRIORITY,
        Task,
        TaskError,
        TaskResult,
        TaskResultStatus,
    )
    from django_tasks.base import TaskContext as DjangoTaskContext
    from django_tasks.exceptions import InvalidTaskError, TaskResultDoesNotExist
    from django_tasks.signals import task_enqueued, task_finished, task_started
    from django_tasks.utils import normalize_json

logger = logging.getLogger(__name__)

HANDLER = "django_tasks.call"
ACTOR = "django-tasks"
DEFAULT_OPTIONS: dict[str, Any] = {
    "CREATE_SCHEDULERS": True,  # a queue_name with no scheduler yet creates one
    "SCHEDULER_DEFAULTS": {},  # fields of the schedulers it creates (retry policy, ...)
    "ENQUEUE_ON_COMMIT": True,  # inside a transaction, enqueue once it commits
}
DATA_KEYS = frozenset({"task", "backend", "args", "kwargs", "run_after"})
STATUSES = {
    TaskStatus.QUEUED: TaskResultStatus.READY,
    TaskStatus.DISPATCHED: TaskResultStatus.READY,  # in the broker, not started
    TaskStatus.RUNNING: TaskResultStatus.RUNNING,
    TaskStatus.COMPLETED: TaskResultStatus.SUCCESSFUL,
}
# "attempt 2/3 failed: <error>; retry at …" (tasks.reports.fail_attempt's note).
_FAILED_NOTE = re.compile(
    r"^attempt \d+/\d+ failed: (?P<error>.*); (?:retry at |no attempts left|cancel was requested)",
    re.DOTALL,
)
_CLASS_PATH = re.compile(r"^(?P<path>[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+): ")


class AttemptFailed(Exception):
    """The class of an error that no exception of the function raised: its lease ran out (the
    worker died), its time limit passed, or an operator cancelled it."""


class SchedulerBackend(BaseTaskBackend):
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        unknown = sorted(set(self.options) - set(DEFAULT_OPTIONS))
        if unknown:
            raise ImproperlyConfigured(
                f"TASKS[{alias!r}]['OPTIONS']: unknown {unknown}; known: {sorted(DEFAULT_OPTIONS)}."
            )
        options = {**DEFAULT_OPTIONS, **self.options}
        self.create_schedulers = bool(options["CREATE_SCHEDULERS"])
        self.enqueue_on_commit = bool(options["ENQUEUE_ON_COMMIT"])
        self.scheduler_defaults = dict(options["SCHEDULER_DEFAULTS"])
        settable = set(SCHEDULER_SETTABLE) - {"kind", "handler"}
        if wrong := sorted(set(self.scheduler_defaults) - settable):
            raise ImproperlyConfigured(
                f"TASKS[{alias!r}]['OPTIONS']['SCHEDULER_DEFAULTS']: {wrong} cannot be set; "
                f"these can: {sorted(settable)}."
            )
        for queue_name in self.queues:
            _check_queue_name(queue_name, exception=ImproperlyConfigured)

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        _check_queue_name(task.queue_name, exception=InvalidTaskError)

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        """Queue the call: at once, or once the caller's transaction commits (ENQUEUE_ON_COMMIT),
        so a rolled-back transaction enqueues nothing."""
        self.validate_task(task)
        args, kwargs = normalize_json(list(args)), normalize_json(dict(kwargs))
        scheduler = self._scheduler(task.queue_name)
        task_id = uuid.uuid4()
        data: dict[str, Any] = {
            "task": task.module_path,
            "backend": self.alias,
            "args": args,
            "kwargs": kwargs,
        }
        if task.run_after is not None:
            data["run_after"] = task.run_after.isoformat()
        result = _new_result(task, task_id, args, kwargs, backend=self.alias)
        push = partial(self._push, result, scheduler.id, data, task)
        if self.enqueue_on_commit and transaction.get_connection().in_atomic_block:
            transaction.on_commit(push, robust=True)
        else:
            push()
        return result

    def _push(
        self, result: TaskResult, scheduler_id: str, data: dict[str, Any], task: Task
    ) -> None:
        queued = services.task_push(
            scheduler_id=scheduler_id,
            data=data,
            priority=-task.priority,
            not_before=task.run_after,
            actor=f"{ACTOR}:{self.alias}",
            extra={"id": uuid.UUID(result.id)},
        )
        object.__setattr__(result, "enqueued_at", queued.created_at)
        task_enqueued.send(type(self), task_result=result)

    def _scheduler(self, queue_name: str) -> Scheduler:
        """The celery queue of `queue_name`, created when missing if the options allow."""
        scheduler = Scheduler.objects.filter(id=queue_name).first()
        if scheduler is None and self.create_schedulers:
            scheduler = self._create_scheduler(queue_name)
        if scheduler is None:
            raise InvalidTaskError(
                f"Queue {queue_name!r}: there is no scheduler {queue_name!r} and "
                f"CREATE_SCHEDULERS is off; create it (kind celery, handler {HANDLER!r})."
            )
        if scheduler.kind != SchedulerKind.CELERY or scheduler.handler != HANDLER:
            runs = scheduler.handler or "pull runners"
            raise InvalidTaskError(
                f"Queue {queue_name!r}: scheduler {queue_name!r} runs {runs}, not Django Tasks "
                f"(a celery scheduler with handler {HANDLER!r})."
            )
        return scheduler

    def _create_scheduler(self, queue_name: str) -> Scheduler:
        fields = {
            "description": f"Django Tasks queue {queue_name!r} (backend {self.alias!r})",
            **self.scheduler_defaults,
            "kind": SchedulerKind.CELERY,
            "handler": HANDLER,
        }
        try:
            with transaction.atomic():
                scheduler = services.scheduler_create(id=queue_name, **fields)
        except (IntegrityError, ValidationError):
            existing = Scheduler.objects.filter(id=queue_name).first()
            if existing is None:
                raise  # not a race with another creator: bad SCHEDULER_DEFAULTS
            return existing
        logger.info("scheduler %s created for Django Tasks backend %s", queue_name, self.alias)
        return scheduler

    def get_result(self, result_id: str) -> TaskResult:
        try:
            task_id = uuid.UUID(str(result_id))
        except ValueError:
            raise TaskResultDoesNotExist(result_id) from None
        row = QueuedTask.objects.filter(id=task_id, scheduler__handler=HANDLER).first()
        if row is None:
            raise TaskResultDoesNotExist(result_id)
        try:
            return task_result(row, backend=self.alias)
        except InvalidRequest as exc:  # its function is gone from the code since
            raise InvalidTaskError(f"Task result {result_id}: {exc.message}") from None


def _check_queue_name(queue_name: str, *, exception: type[Exception]) -> None:
    try:
        scheduler_id_validator(queue_name)
    except ValidationError:
        raise exception(
            f"Queue {queue_name!r}: a queue name is a scheduler id: 1-64 lower-case letters, "
            "digits, '-' or '_', starting with a letter or digit."
        ) from None


def _new_result(
    task: Task, task_id: uuid.UUID, args: list[Any], kwargs: dict[str, Any], *, backend: str
) -> TaskResult:
    return TaskResult(
        task=task,
        id=str(task_id),
        status=TaskResultStatus.READY,
        enqueued_at=None,
        started_at=None,
        finished_at=None,
        last_attempted_at=None,
        args=args,
        kwargs=kwargs,
        backend=backend,
        errors=[],
        worker_ids=[],
    )


# --- reading our task as a TaskResult ----------------------------------------------------------


def task_result(row: QueuedTask, *, backend: str) -> TaskResult:
    """Our task `row` (of a Django Tasks queue) as Django Tasks sees it."""
    data = row.data
    task = _as_enqueued(load_task(data["task"]), row)
    starts = list(
        row.events.filter(to_status=TaskStatus.RUNNING)
        .order_by("at", "id")
        .values_list("at", "actor")
    )
    result = TaskResult(
        task=task,
        id=str(row.id),
        status=STATUSES.get(row.status, TaskResultStatus.FAILED),
        enqueued_at=row.created_at,
        started_at=starts[0][0] if starts else None,
        finished_at=row.modified_at if row.status in FINAL_STATUSES else None,
        last_attempted_at=starts[-1][0] if starts else None,
        args=data.get("args", []),
        kwargs=data.get("kwargs", {}),
        backend=data.get("backend", backend),
        errors=_errors(row),
        worker_ids=[actor for _, actor in starts],
    )
    if row.status == TaskStatus.COMPLETED:
        object.__setattr__(result, "_return_value", row.result)
    return result


def _as_enqueued(task: Task, row: QueuedTask) -> Task:
    """The task as it was enqueued (`.using(...)` changes live in our row, not the module)."""
    run_after = parse_datetime(row.data["run_after"]) if row.data.get("run_after") else None
    priority = max(TASK_MIN_PRIORITY, min(TASK_MAX_PRIORITY, -row.priority))
    try:
        return task.using(priority=priority, queue_name=row.scheduler_id, run_after=run_after)
    except InvalidTaskError:
        return task  # pushed by hand with what the backend would refuse: as the module has it


def _errors(row: QueuedTask) -> list[TaskError]:
    notes = TaskEvent.objects.filter(task_id=row.id, note__startswith="attempt ")
    notes = notes.order_by("at", "id")
    errors = [
        _task_error(match["error"])
        for note in notes.values_list("note", flat=True)
        if (match := _FAILED_NOTE.match(note))
    ]
    if not errors and row.error and row.status in FINAL_STATUSES:
        errors.append(_task_error(row.error))
    return errors


def _task_error(error: str) -> TaskError:
    match = _CLASS_PATH.match(error)
    path = match["path"] if match else f"{AttemptFailed.__module__}.{AttemptFailed.__qualname__}"
    return TaskError(exception_class_path=path, traceback=error)


# --- the worker's side: the handler that runs enqueued functions -------------------------------


def load_task(path: Any) -> Task:
    """The `@task` at module path `path`, from an installed app's module only (a path comes from
    a task's data: it never imports anything else); InvalidRequest (400 on `data`) if none."""
    if not isinstance(path, str) or "." not in path:
        raise InvalidRequest("data", "task must be a module path, e.g. 'myapp.tasks.send'.")
    module = path.rpartition(".")[0]
    if not any(module == a.name or module.startswith(f"{a.name}.") for a in apps.get_app_configs()):
        raise InvalidRequest("data", f"task {path!r} is not in an installed app's module.")
    try:
        task = import_string(path)
    except ImportError as exc:
        raise InvalidRequest("data", f"task {path!r} cannot be imported ({exc}).") from None
    if not isinstance(task, Task):
        raise InvalidRequest("data", f"task {path!r} is not a Django Tasks task (@task).")
    return task


def check_data(data: dict[str, Any]) -> None:
    """What a push to a Django Tasks queue must carry (the backend writes exactly this)."""
    if not isinstance(data, dict):
        raise InvalidRequest("data", "must be an object.")
    if unknown := sorted(set(data) - DATA_KEYS):
        raise InvalidRequest("data", f"unknown keys {unknown}; known: {sorted(DATA_KEYS)}.")
    load_task(data.get("task"))
    if not isinstance(data.get("args", []), list):
        raise InvalidRequest("data", "args must be a list.")
    if not isinstance(data.get("kwargs", {}), dict):
        raise InvalidRequest("data", "kwargs must be an object.")
    run_after = data.get("run_after")
    if run_after is not None and not (isinstance(run_after, str) and parse_datetime(run_after)):
        raise InvalidRequest("data", "run_after must be an ISO 8601 date and time.")


def run_enqueued(ctx: TaskContext) -> Any:
    """Call the enqueued function with its arguments (and its TaskContext when it takes one);
    the return value, as JSON, is the result. Django Tasks' signals are sent around it."""
    check_data(ctx.data)
    row = QueuedTask.objects.select_related("scheduler").get(id=ctx.task_id)
    result = task_result(row, backend=ctx.data.get("backend", "default"))
    task, args, kwargs = result.task, result.args, result.kwargs
    task_started.send(SchedulerBackend, task_result=result)
    try:
        if task.takes_context:
            value = task.call(DjangoTaskContext(task_result=result), *args, **kwargs)
        else:
            value = task.call(*args, **kwargs)
        value = normalize_json(value)  # as Django's backends: a return value must be JSON
    except Exception as exc:
        _finished(result, TaskResultStatus.FAILED, error=describe_error(exc))
        raise
    _finished(result, TaskResultStatus.SUCCESSFUL, value=value)
    return value


def _finished(result: TaskResult, status: str, *, value: Any = None, error: str = "") -> None:
    object.__setattr__(result, "status", status)
    object.__setattr__(result, "finished_at", timezone.now())
    if error:
        result.errors.append(_task_error(error))
    else:
        object.__setattr__(result, "_return_value", value)
    task_finished.send(SchedulerBackend, task_result=result)


def describe_error(exc: BaseException) -> str:
    """ "module.Class: message": Django Tasks' errors name the exception's class by its path."""
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}: {exc}"


HANDLERS[HANDLER] = Handler(
    name=HANDLER,
    func=run_enqueued,
    retry=None,  # the queue's policy (SCHEDULER_DEFAULTS sets it for the queues it creates)
    validate=check_data,
    describe_error=describe_error,
)
