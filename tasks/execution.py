"""Running one task on a Celery worker: claim, lock, heartbeat, run the handler, report.

Nothing lost, nothing twice: the claim is a compare-and-swap on the attempt that was
dispatched; while the handler runs a thread extends the task's lease and its locks; if the
worker dies, the lease runs out and the reaper turns the attempt into a failure (retried by
policy). A late report from a worker whose lease was taken back is refused by the fence.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    connections,
)
from django.utils import timezone

from scheduler_site import tracing
from tasks import dispatch, locks, services
from tasks.exceptions import QueueError, TransitionRefused
from tasks.leases import LeaseProof
from tasks.metrics import QUEUE_WAIT_SECONDS
from tasks.models import Task
from tasks.registry import Handler, TaskCancelled, TaskContext, get_handler, running

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Heartbeat:
    """One running task's lease as this process keeps it: every WORKER_HEARTBEAT_SECONDS the
    process's beater extends the task's lease and its locks, and notices a cancel request (the
    heartbeat is refused) or a lost lease."""

    def __init__(self, task: Task, lock_names: list[str]) -> None:
        self.task = task
        self.lock_names = lock_names
        self.interval = settings.WORKER_HEARTBEAT_SECONDS
        self.lease = timedelta(seconds=self.interval * 3)
        self.due_at = time.monotonic() + self.interval
        self.cancelled = threading.Event()
        # Held while beating: stop() waits for a beat in flight and marks the heartbeat
        # stopped, so a beat the beater had already picked up does not land after it.
        self.beating = threading.Lock()
        self.stopped = False

    def beat(self) -> None:
        with self.beating:
            if self.stopped:
                return
            try:
                services.task_heartbeat(
                    task_id=self.task.id,
                    attempt=self.task.attempts,
                    lease_seconds=int(self.lease.total_seconds()),
                    proof=LeaseProof.holder(self.task.lease_token),
                )
            except TransitionRefused as exc:
                logger.info("task %s: heartbeat refused (%s)", self.task.id, exc.message)
                self.cancelled.set()
            except Exception:
                logger.exception("task %s: heartbeat failed", self.task.id)
            try:
                locks.extend(self.lock_names, owner=str(self.task.id), ttl=self.lease)
            except Exception:
                logger.exception("task %s: extending its locks failed", self.task.id)
            self.due_at = time.monotonic() + self.interval

    def start(self) -> None:
        _beater().add(self)

    def stop(self) -> None:
        _beater().remove(self)
        with self.beating:
            self.stopped = True


class Beater(threading.Thread):
    """One thread per worker process beats every running task's Heartbeat when due. A thread
    per task cost more than a no-op task's whole claim: most tasks end before their first
    beat."""

    def __init__(self) -> None:
        super().__init__(name="heartbeats", daemon=True)
        self.heartbeats: set[Heartbeat] = set()
        self.guard = threading.Lock()

    def add(self, heartbeat: Heartbeat) -> None:
        with self.guard:
            self.heartbeats.add(heartbeat)

    def remove(self, heartbeat: Heartbeat) -> None:
        with self.guard:
            self.heartbeats.discard(heartbeat)

    def run(self) -> None:
        while True:
            try:
                self._round()
            except Exception:  # a dead beater would let every running task's lease run out
                logger.exception("heartbeat round failed")
                time.sleep(1)

    def _round(self) -> None:
        time.sleep(self._seconds_to_next())
        with self.guard:
            due = [h for h in self.heartbeats if h.due_at <= time.monotonic()]
            idle = not self.heartbeats
        if due:
            # This thread's connection outlives any one task: drop it when broken or past
            # CONN_MAX_AGE, as the worker does before each task.
            close_old_connections()
        elif idle:
            connections.close_all()  # nothing to beat: hold no connection meanwhile
        for heartbeat in due:
            heartbeat.beat()

    def _seconds_to_next(self) -> float:
        with self.guard:
            next_due = min((h.due_at for h in self.heartbeats), default=None)
        if next_due is None:
            return settings.WORKER_HEARTBEAT_SECONDS
        return max(0.0, next_due - time.monotonic())


_BEATER: Beater | None = None
_BEATER_PID = 0
_BEATER_GUARD = threading.Lock()


def _beater() -> Beater:
    """This process's beater, started on first use: a prefork child must not inherit its
    parent's (threads do not survive fork), and one that died is replaced."""
    global _BEATER, _BEATER_PID
    with _BEATER_GUARD:
        if _BEATER is None or os.getpid() != _BEATER_PID or not _BEATER.is_alive():
            _BEATER, _BEATER_PID = Beater(), os.getpid()
            _BEATER.start()
        return _BEATER


class Chain:
    """A batch's next entry, claimed together with this task's successful report (one
    statement on PostgreSQL, WORKER_CLAIM_WITH_REPORT): `pick()` names it, or None (the last
    entry, or the batch is out of time). After the report, `claimed` is the task its report
    claimed, or None if it claimed none (its claim refused, or the task held by another
    transaction: the batch then claims it on its own)."""

    def __init__(self, pick: Callable[[], tuple[uuid.UUID, int] | None]) -> None:
        self.pick = pick
        self.claimed: Task | None = None


def execute(task_id: uuid.UUID, attempt: int, *, worker: str, chain: Chain | None = None) -> str:
    """Run one dispatched attempt; returns what happened (for logs and tests)."""
    task = claim(task_id, attempt, worker=worker)
    if task is None:
        return "skipped"
    return run_claimed(task, attempt, worker=worker, chain=chain)


def claim(task_id: uuid.UUID, attempt: int, *, worker: str) -> Task | None:
    """DISPATCHED -> RUNNING on `attempt` (a fresh lease token); None if refused."""
    try:
        return _reconnecting(
            lambda: services.task_start(
                task_id=task_id, actor=worker, attempt=attempt, mint_token=True
            )
        )
    except QueueError as exc:
        logger.info("task %s attempt %s: not claimed (%s)", task_id, attempt, exc.message)
        return None


def run_claimed(task: Task, attempt: int, *, worker: str, chain: Chain | None = None) -> str:
    """The rest of an attempt once claimed: refill, locks, the handler, the report."""
    dispatch.refill_on_claim(task)
    waited = (timezone.now() - task.not_before).total_seconds()
    QUEUE_WAIT_SECONDS.labels(task.scheduler_id).observe(max(waited, 0.0))
    proof = LeaseProof.holder(task.lease_token)
    try:
        handler = get_handler(task.handler_name)
        wanted = handler.locks_for(task.data)
    except Exception as exc:
        # An unknown handler, or a locks function that raised on this task's data (a KeyError
        # on a missing key): a failed attempt with the error, not a task left RUNNING until
        # its lease is reaped.
        error = exc.message if isinstance(exc, QueueError) else f"{type(exc).__name__}: {exc}"
        services.task_fail(task_id=task.id, error=error, actor=worker, attempt=attempt, proof=proof)
        return "failed"
    lock_names = locks.acquire(
        wanted,
        owner=str(task.id),
        ttl=timedelta(seconds=settings.WORKER_HEARTBEAT_SECONDS * 3),
    )
    if lock_names is None:
        services.task_hand_back(
            task_id=task.id,
            reason=f"lock held: {', '.join(lock.name for lock in wanted)}",
            actor=worker,
            attempt=attempt,
            proof=proof,
            lock_wait=True,
        )
        return "deferred"
    try:
        return _run(task, handler, lock_names, worker=worker, chain=chain)
    finally:
        locks.release(lock_names, owner=str(task.id))
        dispatch.refill_after_run(task)


def _reconnecting(call: Callable[[], T]) -> T:
    """`call()`; once more on a fresh connection if the database connection turns out to be
    broken (the worker keeps connections across tasks without a health check before each: a
    database restart is noticed here). Other database errors (a deadlock, a timeout) are
    raised as they are. A claim or report that had committed before the connection broke is
    refused the second time by the compare-and-swap: never applied twice."""
    try:
        return call()
    except (InterfaceError, OperationalError) as exc:
        if connection.in_atomic_block or (connection.connection and connection.is_usable()):
            raise  # a caller's transaction, or an error of the statement, not of the link
        logger.warning("database connection lost (%s); reconnecting once", exc)
        connection.close()
        return call()


def _run(
    task: Task, handler: Handler, lock_names: list[str], *, worker: str, chain: Chain | None
) -> str:
    heartbeat = Heartbeat(task, lock_names)
    context = TaskContext(
        task_id=task.id,
        scheduler_id=task.scheduler_id,
        data=task.data,
        attempt=task.attempts,
        is_cancelled=lambda: heartbeat.cancelled.is_set() or _cancel_requested(task.id),
        worker=worker,
    )
    heartbeat.start()
    error, trace = None, ""
    span = {"scheduler.task.id": str(task.id), "scheduler.handler": task.handler_name}
    try:
        with running(context), tracing.task_span("task.handler", task.trace_context, **span):
            result = handler.func(context)
    except TaskCancelled as exc:
        error = f"cancelled: {exc}"
    except SoftTimeLimitExceeded:
        error, trace = "soft time limit exceeded", traceback.format_exc()  # where it was stuck
    except Exception as exc:
        describe = handler.describe_error or one_line
        error, trace = describe(exc), traceback.format_exc()
        logger.info("task %s attempt %s failed: %s", task.id, task.attempts, error)
    finally:
        heartbeat.stop()  # before the report: no beat races it
    with tracing.task_span("task.report", task.trace_context, **span):
        if error is not None:
            return _report_failure(task, handler, error, trace, worker=worker)
        return _report_success(task, result, worker=worker, chain=chain)


def one_line(exc: BaseException, limit: int = 1000) -> str:
    """`Type: message` on one line (the task's `error`); the traceback keeps the rest."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    more = " …" if len(first) > limit or first != text else ""
    return f"{type(exc).__name__}: {first[:limit]}{more}"


def _cancel_requested(task_id: uuid.UUID) -> bool:
    return Task.objects.filter(id=task_id, cancel_requested_at__isnull=False).exists()


def _report_success(task: Task, result: Any, *, worker: str, chain: Chain | None = None) -> str:
    taken = chain.pick() if chain is not None and settings.WORKER_CLAIM_WITH_REPORT else None
    if chain is not None and taken is not None and taken[0] != task.id:
        return _report_success_and_claim(task, result, chain, taken, worker=worker)
    try:
        _reconnecting(
            lambda: services.task_complete(
                task_id=task.id,
                result=result,
                actor=worker,
                attempt=task.attempts,
                proof=LeaseProof.holder(task.lease_token),
            )
        )
    except QueueError as exc:
        logger.warning("task %s: result not recorded (%s)", task.id, exc.message)
        return "lost"
    return "completed"


def _report_failure(task: Task, handler: Handler, error: str, trace: str, *, worker: str) -> str:
    try:
        _reconnecting(
            lambda: services.task_fail(
                task_id=task.id,
                error=error,
                traceback=trace,
                actor=worker,
                attempt=task.attempts,
                proof=LeaseProof.holder(task.lease_token),
                retry=handler.retry,
            )
        )
    except QueueError as exc:
        logger.warning("task %s: failure not recorded (%s)", task.id, exc.message)
        return "lost"
    return "failed"


def _report_success_and_claim(
    task: Task, result: Any, chain: Chain, taken: tuple[uuid.UUID, int], *, worker: str
) -> str:
    """The report with the claim of the batch's next task, each refused on its own."""
    try:
        done, started = _reconnecting(
            lambda: services.task_complete_and_start(
                task_id=task.id,
                result=result,
                actor=worker,
                attempt=task.attempts,
                proof=LeaseProof.holder(task.lease_token),
                next_id=taken[0],
                next_attempt=taken[1],
            )
        )
    except QueueError as exc:  # refused before anything was written: the next is not claimed
        logger.warning("task %s: result not recorded (%s)", task.id, exc.message)
        return "lost"
    if isinstance(started, QueueError):
        # Refused (cancelled meanwhile, say) or held by another transaction, which the
        # statement does not wait for (queue.complete_and_start): the batch claims it on its
        # own, which waits for a holder and refuses as this claim would have.
        logger.info("task %s attempt %s: claimed on its own (%s)", *taken, started.message)
    else:
        chain.claimed = started
    if isinstance(done, QueueError):
        logger.warning("task %s: result not recorded (%s)", task.id, done.message)
        return "lost"
    return "completed"
