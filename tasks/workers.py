"""Who does the work (DESIGN 9.6): Celery workers, pull runners and beat register and
heartbeat into `Worker` rows, which `GET /api/workers/`, the admin, the dashboard and
`GET /api/health/` read.

Nothing here runs per task. A Celery worker node registers when it is ready (`worker_ready`)
and then one timer thread of its main process beats every WORKER_HEARTBEAT_SECONDS; it marks
itself stopped on a clean shutdown. Beat is seen when it sends a periodic job (at most once a
second). A pull runner is seen when its calls reach the API, at most once per
RUNNER_SEEN_WRITE_SECONDS per web process, with the name, host and pid its X-Runner-* headers
give (the account name and the client address otherwise).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from celery.signals import beat_init, before_task_publish, worker_ready, worker_shutdown
from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.utils import timezone

from tasks import selectors
from tasks.models import Worker, WorkerKind

logger = logging.getLogger(__name__)

# Rows of processes not seen for this long are deleted (a host that was replaced).
FORGET_AFTER = timedelta(days=1)
RUNNER_HEADERS = {"name": "HTTP_X_RUNNER_NAME", "host": "HTTP_X_RUNNER_HOST"}


# --- the writes ------------------------------------------------------------------------------


def worker_seen(
    *,
    kind: str,
    name: str,
    host: str = "",
    pid: int | None = None,
    queues: Sequence[str] | None = None,
    tasks_held: int | None = None,
    account: str = "",
    started: bool = False,
) -> Worker:
    """Record that a worker is alive now (an upsert on kind + name). `queues`/`tasks_held`
    of None keep what the row says; `started` marks a (re)start: a fresh start time, not
    stopped."""
    now = timezone.now()
    values: dict[str, Any] = {"last_seen_at": now, "stopped_at": None}
    if host:
        values["host"] = host[:255]
    if pid is not None:
        values["pid"] = pid
    if queues is not None:
        values["queues"] = sorted(set(queues))
    if tasks_held is not None:
        values["tasks_held"] = tasks_held
    if account:
        values["account"] = account[:150]
    if started:
        values["started_at"] = now
    for _ in range(2):  # a second process inserting the same name first: update that row
        try:
            with transaction.atomic():
                worker, _created = Worker.objects.update_or_create(
                    kind=kind, name=name[:200], defaults=values
                )
            return worker
        except IntegrityError:
            continue
    raise RuntimeError(f"could not register {kind} {name}")


def worker_stopped(*, kind: str, name: str) -> None:
    Worker.objects.filter(kind=kind, name=name[:200]).update(
        stopped_at=timezone.now(), tasks_held=0
    )


def workers_forget_unseen() -> int:
    """Delete the rows of processes not seen for FORGET_AFTER (one indexed range a kind)."""
    cutoff = timezone.now() - FORGET_AFTER
    deleted = 0
    for kind in WorkerKind.values:
        deleted += Worker.objects.filter(kind=kind, last_seen_at__lt=cutoff).delete()[0]
    return deleted


# --- pull runners, seen by the API -----------------------------------------------------------

_runner_writes: dict[tuple[str, str], float] = {}
_runner_guard = threading.Lock()


def runner_identity(request: Any) -> tuple[str, str, int | None]:
    """(name, host, pid) of the runner that made `request`: its X-Runner-Name, -Host and -Pid
    headers (the pull runner sends them), else the account's name and the client address."""
    meta = request.META
    name = meta.get(RUNNER_HEADERS["name"], "").strip()[:200]
    host = meta.get(RUNNER_HEADERS["host"], "").strip() or meta.get("REMOTE_ADDR", "")
    pid_text = meta.get("HTTP_X_RUNNER_PID", "").strip()
    pid = int(pid_text) if pid_text.isdigit() and len(pid_text) < 10 else None
    return name or getattr(request.user, "username", "") or "anonymous", host, pid


def runner_seen(request: Any, *, scheduler_id: str | None = None) -> None:
    """A runner's call reached the API: note it, at most once per RUNNER_SEEN_WRITE_SECONDS
    per runner and queue in this process, so a busy runner costs no write per call."""
    name, host, pid = runner_identity(request)
    key = (name, scheduler_id or "")
    now = time.monotonic()
    with _runner_guard:
        if now - _runner_writes.get(key, -1e9) < settings.RUNNER_SEEN_WRITE_SECONDS:
            return
        _runner_writes[key] = now
    try:
        known = Worker.objects.filter(kind=WorkerKind.RUNNER, name=name).first()
        queues = set(known.queues if known else [])
        if scheduler_id:
            queues.add(scheduler_id)
        worker_seen(
            kind=WorkerKind.RUNNER,
            name=name,
            host=host,
            pid=pid,
            queues=sorted(queues),
            # A pop holds its tasks in the account's name (the events' actor): runners that
            # share an account share this count.
            tasks_held=selectors.tasks_held_by(getattr(request.user, "username", "") or name),
            account=getattr(request.user, "username", ""),
        )
    except Exception:  # the runner's call matters more than its registration
        logger.exception("could not record runner %s", name)


# --- Celery worker nodes: a timer thread in the main process ---------------------------------


class NodeHeartbeat(threading.Thread):
    """Beats a Celery worker node's row every WORKER_HEARTBEAT_SECONDS, and counts the tasks
    it holds: one write and one count per interval, whatever the task rate."""

    def __init__(self, name: str, queues: Sequence[str]) -> None:
        super().__init__(name="worker-registration", daemon=True)
        self.node, self.queues = name, list(queues)
        self.stopping = threading.Event()

    def beat(self, *, started: bool = False) -> None:
        try:
            worker_seen(
                kind=WorkerKind.CELERY,
                name=self.node,
                host=socket.gethostname(),
                pid=os.getpid(),
                queues=self.queues,
                tasks_held=selectors.tasks_held_by(self.node),
                started=started,
            )
            if started:
                workers_forget_unseen()
        except Exception:
            logger.exception("worker %s: registration heartbeat failed", self.node)
        finally:
            connections.close_all()  # this thread's own: hold none between beats

    def run(self) -> None:
        while not self.stopping.wait(settings.WORKER_HEARTBEAT_SECONDS):
            self.beat()


_node: NodeHeartbeat | None = None


@worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    global _node
    queues = [queue.name for queue in sender.task_consumer.queues]
    _node = NodeHeartbeat(sender.hostname, queues)
    _node.beat(started=True)
    _node.start()
    logger.info("worker %s registered (queues: %s)", sender.hostname, ", ".join(queues))


@worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    if _node is None:
        return
    _node.stopping.set()
    try:
        worker_stopped(kind=WorkerKind.CELERY, name=_node.node)
    except Exception:
        logger.exception("worker %s: could not record its shutdown", _node.node)


# --- beat: seen when it sends ----------------------------------------------------------------

_beat: dict[str, Any] = {}


def _beat_name() -> str:
    return f"beat@{socket.gethostname()}"


@beat_init.connect
def _beat_started(**_: Any) -> None:
    _beat.update(name=_beat_name(), written=time.monotonic())
    try:
        worker_seen(
            kind=WorkerKind.BEAT,
            name=_beat["name"],
            host=socket.gethostname(),
            pid=os.getpid(),
            started=True,
        )
    except Exception:  # beat's job is to send; the health check will say it is unseen
        logger.exception("beat: could not register")


@before_task_publish.connect
def _beat_sent(**_: Any) -> None:
    # In beat only (beat_init ran in this process), and at most once a second.
    if not _beat or time.monotonic() - _beat["written"] < 1.0:
        return
    _beat["written"] = time.monotonic()
    try:
        worker_seen(kind=WorkerKind.BEAT, name=_beat["name"], pid=os.getpid())
    except Exception:
        logger.exception("beat: could not record its tick")
