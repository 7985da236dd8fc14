"""Waking long-polling pops when a pull queue gets work (DESIGN §9.3 `wait`).

On PostgreSQL whatever makes tasks of a pull queue QUEUED sends `pg_notify(channel, scheduler
id)` in its transaction, so a NOTIFY arrives when that commits. One listener thread per
process LISTENs on the channel for all the process's waiting pops, and each notification wakes
one waiter of that queue in the process, not all of them: every woken waiter pops, so waking
all of a gunicorn worker's waiting threads made all but one pop for nothing, on the CPU the
winner and the push needed (measured: 4 waiting runners added about 3 ms to push → popped).
A NOTIFY names the queue and how many tasks became due (one
per push; a batch says how many), and that many waiters are woken. No query runs while a pop
waits. SQLite has no notifications: there the waiter re-checks every
SQLITE_POLL_SECONDS, and so does a PostgreSQL waiter while its process's listener is not
connected.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.utils import timezone

from tasks.models import SchedulerKind, Task, TaskStatus

logger = logging.getLogger(__name__)

CHANNEL = "scheduler_queued"
SQLITE_POLL_SECONDS = 0.2
LISTENER_READY_SECONDS = 2.0  # a waiter's first pop waits this long for the LISTEN at most
LISTENER_IDLE_SECONDS = 60.0  # with no waiter for this long, the listener closes its connection
EVERY_WAITER = 1_000_000  # a count that wakes all of a queue's waiters (a resumed queue)


def channel_for(kind: str) -> str:
    """The channel a statement that queues tasks of a `kind` queue NOTIFYs itself ("" none)."""
    return CHANNEL if kind == SchedulerKind.PULL and connection.vendor == "postgresql" else ""


def payload(scheduler_id: str, count: int = 1) -> str:
    """A NOTIFY's payload: the queue, and how many of its tasks became due if more than one."""
    return scheduler_id if count == 1 else f"{scheduler_id} {count}"


def _parsed(text: str) -> tuple[str, int]:
    scheduler_id, _, count = text.partition(" ")  # scheduler ids are slugs: no spaces
    return scheduler_id, int(count) if count.isdigit() else 1


def announce(scheduler_id: str, kind: str, count: int = 1) -> None:
    """Wake `count` pops waiting on a pull queue: sent with the caller's transaction
    (PostgreSQL delivers a NOTIFY at commit, or not at all on rollback)."""
    if not channel_for(kind):
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload(scheduler_id, count)])


class Listener(threading.Thread):
    """The process's LISTEN, on a connection of its own, and the waiting pops it wakes. Per
    queue: `waiting` counts the registered waiters (registered before their first pop, so no
    wake-up between a pop and its wait is missed) and `pending` the wake-ups not taken yet,
    never more than the waiters."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(name="pop-wakeups", daemon=True)
        self.params = params
        self.guard = threading.Lock()
        self.wakers: dict[str, threading.Condition] = {}
        self.waiting: Counter[str] = Counter()
        self.pending: Counter[str] = Counter()
        self.ready = threading.Event()
        self.stopping = False
        self.idle_since = time.monotonic()

    def register(self, scheduler_id: str) -> bool:
        with self.guard:
            if self.stopping:
                return False
            self.waiting[scheduler_id] += 1
            return True

    def unregister(self, scheduler_id: str) -> None:
        with self.guard:
            self.waiting[scheduler_id] -= 1
            if self.waiting[scheduler_id] <= 0:
                del self.waiting[scheduler_id]
                self.pending.pop(scheduler_id, None)
                self.wakers.pop(scheduler_id, None)
            elif self.pending[scheduler_id] > self.waiting[scheduler_id]:
                self.pending[scheduler_id] = self.waiting[scheduler_id]
            if not self.waiting:
                self.idle_since = time.monotonic()

    def wait(self, scheduler_id: str, timeout: float) -> None:
        """Until a wake-up for the queue (taking it) or `timeout`; polls while the listener is
        not connected, since a NOTIFY may then be lost."""
        if not self.ready.is_set():
            timeout = min(timeout, SQLITE_POLL_SECONDS)
        with self.guard:
            waker = self.wakers.setdefault(scheduler_id, threading.Condition(self.guard))
            if not self.pending[scheduler_id]:
                waker.wait(timeout)
            if self.pending[scheduler_id]:
                self.pending[scheduler_id] -= 1

    def wake(self, scheduler_id: str, count: int = 1) -> None:
        with self.guard:
            waiting = self.waiting[scheduler_id]  # a Counter: no key is added
            if not waiting:
                return
            self.pending[scheduler_id] = min(self.pending[scheduler_id] + count, waiting)
            waker = self.wakers.get(scheduler_id)
            if waker is not None:
                waker.notify(count)

    def wake_all(self) -> None:
        """Every waiter re-checks: notifications may have been lost (the connection broke)."""
        with self.guard:
            for scheduler_id, waiting in self.waiting.items():
                self.pending[scheduler_id] = waiting
            for waker in self.wakers.values():
                waker.notify_all()

    def run(self) -> None:
        while not self.stopping:
            try:
                self._listen()
            except Exception as exc:  # the database went away: reconnect, meanwhile poll
                logger.warning("pop wake-ups: listener connection lost (%s); reconnecting", exc)
                time.sleep(0.5)
            finally:
                self.ready.clear()
                self.wake_all()

    def _listen(self) -> None:
        with psycopg.connect(**self.params, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.ready.set()
            while not self._stop_if_idle():
                for notice in conn.notifies(timeout=1.0):
                    self.wake(*_parsed(notice.payload))

    def _stop_if_idle(self) -> bool:
        with self.guard:
            idle = not self.waiting and time.monotonic() - self.idle_since > LISTENER_IDLE_SECONDS
            self.stopping = self.stopping or idle
            return self.stopping

    def stop(self) -> None:
        with self.guard:
            self.stopping = True
        self.join(5)


_LISTENER: Listener | None = None
_LISTENER_PID = 0
_LISTENER_GUARD = threading.Lock()


def _registered(scheduler_id: str) -> Listener:
    """This process's listener (started on first use, anew after a fork or once it stopped),
    with `scheduler_id` registered on it."""
    global _LISTENER, _LISTENER_PID
    while True:
        with _LISTENER_GUARD:
            current = _LISTENER
            if current is None or current.stopping or os.getpid() != _LISTENER_PID:
                params = connections[DEFAULT_DB_ALIAS].get_connection_params()
                current = _LISTENER = Listener(params)
                _LISTENER_PID = os.getpid()
                current.start()
        if current.register(scheduler_id):
            return current


def stop_listener() -> None:
    """Close this process's listener and its connection (tests, before the database goes)."""
    global _LISTENER
    with _LISTENER_GUARD:
        current, _LISTENER = _LISTENER, None
    if current is not None:
        current.stop()


@contextmanager
def listening(scheduler_id: str) -> Iterator[Listener | None]:
    """Register a waiting pop for the block's duration, before its first pop, so no wake-up
    between that pop and the wait is missed: the listener (None: poll) to wait on."""
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        yield None
        return
    listener = _registered(scheduler_id)
    listener.ready.wait(LISTENER_READY_SECONDS)
    try:
        yield listener
    finally:
        listener.unregister(scheduler_id)


def wait_for_work(scheduler_id: str, *, timeout: float, listener: Listener | None) -> None:
    """Return when `scheduler_id` may have a due task, or after
    `timeout` seconds: a wake-up for it, or the moment its next delayed task (a retry's
    backoff) falls due."""
    timeout = min(timeout, _seconds_to_next_due(scheduler_id))
    if timeout <= 0:
        return
    if listener is None:
        time.sleep(min(timeout, SQLITE_POLL_SECONDS))
        return
    listener.wait(scheduler_id, timeout)


def _seconds_to_next_due(scheduler_id: str) -> float:
    now = timezone.now()
    next_due: datetime | None = (
        Task.objects.filter(scheduler_id=scheduler_id, status=TaskStatus.QUEUED, not_before__gt=now)
        .order_by("not_before")
        .values_list("not_before", flat=True)
        .first()
    )
    return float("inf") if next_due is None else (next_due - now).total_seconds()
