"""The messages of one dispatch round: `tasks.run_task` for one task, `tasks.run_tasks` for
several, built and published the way Celery's `send_task` does, with what is the same for every
message of the round worked out once.

Several tasks a message (DISPATCH_MESSAGE_BATCH): profiled in the worker bench, a Celery
message cost our pool process about as much as a no-op task's claim and report together
(consume, trace, ack, and 0.5 ms to publish it), so a round's tasks travel in fewer messages.
`split` says how: never fewer messages than DISPATCH_MESSAGE_SPREAD (or than tasks), so a round
still spreads over the workers, and the tasks dealt out in turn, so each message starts with
the round's most urgent ones.

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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from kombu.utils.uuid import uuid

from scheduler_site import tracing
from scheduler_site.celery import app

# The Celery name of tasks.jobs.run_task, which takes it from here: one spelling of it.
RUN_TASK = "tasks.run_task"
# tasks.jobs.run_tasks: several tasks in one message, `[[id, attempt], ...]`, run in turn.
RUN_TASKS = "tasks.run_tasks"


class Sendable(Protocol):
    """What a task's message needs: a Task, or a dispatch round's queue.Dispatched."""

    @property
    def id(self) -> Any: ...

    @property
    def attempts(self) -> int: ...

    @property
    def trace_context(self) -> str | None: ...


_MESSAGE_ARGUMENTS = ("time_limit", "soft_time_limit", "expires")


def split(tasks: Sequence[Sendable], *, batch: int, spread: int) -> list[list[Sendable]]:
    """The round's tasks as the messages that carry them: at most `batch` tasks a message, and
    at least min(len(tasks), spread) messages, so that a round of k tasks keeps up to `spread`
    workers busy at once. Dealt out in turn (task i to message i mod m): the round comes in
    priority order, so every message begins with its most urgent tasks."""
    if not tasks:
        return []
    count = min(len(tasks), max(spread, -(-len(tasks) // max(batch, 1))))
    return [list(tasks[start::count]) for start in range(count)]


def _round_options(celery_queue: str, scheduler_id: str, name: str) -> dict[str, Any]:
    """send_task's routing of the round's messages (the routers see the task's name), with the
    registered task's own execution options under ours, as send_task merges them."""
    options: dict[str, Any] = {"queue": celery_queue, "headers": {"scheduler": scheduler_id}}
    registered = app._tasks.get(name)  # as send_task looks it up: not finalizing the app
    if registered is not None:
        defaults = registered._get_exec_options()
        options = {k: v for k, v in defaults.items() if v is not None} | options
    return app.amqp.router.route(options, name, None, None, registered)


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
    """A function sending one message, for the messages of one round: `send(task)` (or a list
    of one) sends `tasks.run_task`, `send([task, ...])` one `tasks.run_tasks` for them all; one
    producer, the messages sent together when the block ends (one Redis round trip)."""
    amqp = app.amqp
    limits: dict[str, tuple[dict[str, Any], tuple[Any, Any, Any]]] = {}
    for name in (RUN_TASK, RUN_TASKS):
        options = _round_options(celery_queue, scheduler_id, name)
        limits[name] = options, _message_limits(options, time_limit, soft_time_limit)
    root_id, parent_id = _parent_ids()
    reply_to, sent_event = app.thread_oid, app.conf.task_send_sent_event
    first = [True]

    def send(what: Sendable | Sequence[Sendable]) -> None:
        group = what if isinstance(what, (list, tuple)) else [what]
        if len(group) == 1:
            name, args = RUN_TASK, [str(group[0].id), group[0].attempts]
        else:
            name, args = RUN_TASKS, [[[str(task.id), task.attempts] for task in group]]
        options, (time_limit, soft_time_limit, expires) = limits[name]
        message_id = uuid()
        # As send_task's call, argument for argument (positional, as it passes them).
        message = amqp.create_task_message(
            message_id, name, args, {}, None, None, None, None, expires, 0, None, None, None,
            reply_to, time_limit, soft_time_limit, sent_event, root_id, parent_id, None, None,
            ignore_result=True,
            # The args' display form (Celery's documented argsrepr/kwargsrepr), as its
            # saferepr would write them (ids and numbers need no truncation).
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
        amqp.send_task_message(producer, name, message, **(options | extra))

    with (
        app.producer_or_acquire() as producer,
        producer.batch(),
        producer.connection._reraise_as_library_errors(),
    ):
        yield send


def send_all(tasks: Sequence[Sendable], send: Any, *, batch: int = 1, spread: int = 1) -> None:
    """The round's messages (`split`). Each task's dispatch is a span in the task's own trace
    (stored at push); a message of one task is sent inside it, so the message carries that
    trace on to the worker. The worker's spans of a task follow its stored trace either way."""
    for group in split(tasks, batch=batch, spread=spread):
        if len(group) > 1:
            tracing.record_handouts("task.dispatch", group)
            send(group)
            continue
        task = group[0]
        attributes = {"scheduler.task.id": str(task.id), "scheduler.task.attempt": task.attempts}
        with tracing.handout_span("task.dispatch", task.trace_context, **attributes):
            send(task)
