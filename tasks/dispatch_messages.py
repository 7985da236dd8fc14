"""The messages of one dispatch round: `tasks.run_task` for each task, built and published the
way Celery's `send_task` does, with what is the same for every message of the round worked out
once.

Profiled in the worker bench (issue 12), `send_task` cost about 1.5 times its own publishing
per message: a dozen lookups in Celery's layered configuration, the router, the registry's
execution options, the parent task's ids, a result object and its entry in the parent's trail
(the refill on claim runs inside a worker's task). None of these differ between the messages of
one round. Each message is still made by `app.amqp.create_task_message` and sent by
`app.amqp.send_task_message` (Celery's documented message API), so its headers, properties and
body are send_task's, and the `before_task_publish` / `after_task_publish` signals (the
OpenTelemetry instrumentation's hook, tests') fire for each one as before. What is left out is
only what a no-result message from a dispatcher does not need: no AsyncResult, no trail entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from kombu.utils.uuid import uuid

from scheduler_site import tracing
from scheduler_site.celery import app

# The Celery name of tasks.jobs.run_task, which takes it from here: one spelling of it.
RUN_TASK = "tasks.run_task"


class Sendable(Protocol):
    """What a task's message needs: a Task, or a dispatch round's queue.Dispatched."""

    @property
    def id(self) -> Any: ...

    @property
    def attempts(self) -> int: ...

    @property
    def trace_context(self) -> str | None: ...


_MESSAGE_ARGUMENTS = ("time_limit", "soft_time_limit", "expires")


def _round_options(celery_queue: str, scheduler_id: str) -> dict[str, Any]:
    """send_task's routing of the round's messages (the routers see the task's name), with the
    registered task's own execution options under ours, as send_task merges them."""
    options: dict[str, Any] = {"queue": celery_queue, "headers": {"scheduler": scheduler_id}}
    registered = app._tasks.get(RUN_TASK)  # as send_task looks it up: not finalizing the app
    if registered is not None:
        defaults = registered._get_exec_options()
        options = {k: v for k, v in defaults.items() if v is not None} | options
    return app.amqp.router.route(options, RUN_TASK, None, None, registered)


def _message_limits(
    options: dict[str, Any], time_limit: Any, soft_time_limit: Any
) -> tuple[Any, Any, Any]:
    """(time_limit, soft_time_limit, expires), taken out of `options`: create_task_message
    takes them as arguments of its own (as send_task does), and passed both ways every message
    failed ("multiple values for argument"). The handler's limits win over the task's own."""
    registered = {name: options.pop(name, None) for name in _MESSAGE_ARGUMENTS}
    return (
        registered["time_limit"] if time_limit is None else time_limit,
        registered["soft_time_limit"] if soft_time_limit is None else soft_time_limit,
        registered["expires"],
    )


def _parent_ids() -> tuple[str | None, str | None]:
    """(root_id, parent_id) as send_task sets them: those of the worker task running now, if
    any (a refill on claim); none for a dispatcher outside a task."""
    parent = app.current_worker_task
    if not parent:
        return None, None
    return parent.request.root_id or parent.request.id, parent.request.id


@contextmanager
def round_sender(
    *, celery_queue: str, scheduler_id: str, time_limit: Any = None, soft_time_limit: Any = None
) -> Iterator[Any]:
    """A function sending one task's message, for the messages of one round: one producer, the
    messages sent together when the block ends (one Redis round trip)."""
    amqp = app.amqp
    options = _round_options(celery_queue, scheduler_id)
    time_limit, soft_time_limit, expires = _message_limits(options, time_limit, soft_time_limit)
    root_id, parent_id = _parent_ids()
    reply_to, sent_event = app.thread_oid, app.conf.task_send_sent_event
    first = [True]

    def send(task: Sendable) -> None:
        args = [str(task.id), task.attempts]
        message_id = uuid()
        # As send_task's call, argument for argument (positional, as it passes them).
        message = amqp.create_task_message(
            message_id, RUN_TASK, args, {}, None, None, None, None, expires, 0, None, None, None,
            reply_to, time_limit, soft_time_limit, sent_event, root_id, parent_id, None, None,
            ignore_result=True,
            # The args' display form (Celery's documented argsrepr/kwargsrepr), as its
            # saferepr would write them (an id and a number need no truncation).
            argsrepr=repr(args),
            kwargsrepr="{}",
            **options,
        )  # fmt: skip
        extra: dict[str, Any] = {"argsrepr": repr(args), "kwargsrepr": "{}"}
        if not first[0]:
            # The round's first message declares the queue (kombu caches it); the rest skip
            # kombu's per-message declaration check, which builds a retry wrapper each time.
            extra["declare"] = []
        first[0] = False
        amqp.send_task_message(producer, RUN_TASK, message, **(options | extra))

    with (
        app.producer_or_acquire() as producer,
        producer.batch(),
        producer.connection._reraise_as_library_errors(),
    ):
        yield send


def send_all(tasks: Iterable[Sendable], send: Any) -> None:
    """Each task's message, in the task's own trace (stored at push): the message carries it
    on to the worker, whichever process dispatches and whenever."""
    for task in tasks:
        attributes = {"scheduler.task.id": str(task.id), "scheduler.task.attempt": task.attempts}
        with tracing.handout_span("task.dispatch", task.trace_context, **attributes):
            send(task)
