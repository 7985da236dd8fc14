"""What the worker bench's legs share: constants, settings, the worker processes (the e2e
tests' WorkerProcess), database state, CPU accounting and the result records."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench.common import (
    log,
    machine_cpu,
    postmaster_pid,
    process_cpu,
    production_environment,
    tree_cpu,
    vacuum,
)
from tests.support.processes import WorkerProcess, process_env, purge_broker

HANDLER = "demo.echo"
NOOP_TASK = "celery.accumulate"  # built in: returns its arguments
LATENCY_SCHEDULER = "bench-latency"
THROUGHPUT_SCHEDULER = "bench-throughput"
LATENCY_WARMUP = 5
PAUSE_SECONDS = (0.05, 0.2)
POLL_SECONDS = 0.02  # completion polling; the figures come from event times, not from this
RESCUE_AFTER_SECONDS = 3.0  # still QUEUED after this: the fast path missed, dispatch by hand
SAMPLE_TIMEOUT_SECONDS = 30.0
POLL_DEPTH_SECONDS = 0.1  # the bench's status poll in the throughput leg (broker depth, done?)
THROUGHPUT_CONCURRENCY = 2
THROUGHPUT_WARMUP = 100
WORKER_READY_SECONDS = 90.0

TARGET_P50_MS = 200.0
TARGET_P99_MS = 1000.0
TARGET_RATE = 300.0

LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}):")
SUCCEEDED = re.compile(r"succeeded in ([0-9.]+)s")


# --- settings --------------------------------------------------------------------------------


def embedded_environment(folder: Path) -> dict[str, str]:
    """The environment of the embedded leg's child: `make run`'s SQLite file and filesystem
    broker, in a temporary folder of its own (production settings otherwise)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "CELERY_BROKER_URL", "TEST_REDIS_URL"}
    }
    env.update(
        production_environment(),
        SCHEDULER_VAR_DIR=str(folder),
        DATABASE_URL=f"sqlite:///{folder / 'scheduler.sqlite3'}",
        CELERY_BROKER_URL="filesystem://",
        SCHEDULER_BROKER_DIR=str(folder / "broker"),
    )
    return env


def worker_env() -> dict[str, str]:
    """The e2e tests' worker environment, with production's settings (DEBUG off: with DEBUG
    on, Django renders and keeps every query's SQL, a cost production does not pay)."""
    from django.conf import settings

    env = process_env(
        database=os.environ["DATABASE_URL"],
        broker=settings.CELERY_BROKER_URL,
        broker_dir=settings.CELERY_BROKER_DIR,
        **production_environment(),
    )
    env["SECRET_KEY"] = os.environ["SECRET_KEY"]
    env.pop("WORKER_HEARTBEAT_SECONDS", None)  # the default
    return env


# --- worker processes ------------------------------------------------------------------------


@contextlib.contextmanager
def running_worker(
    name: str,
    *,
    pool: str,
    concurrency: int,
    profile_dir: Path | None = None,
    environ: dict[str, str] | None = None,
) -> Iterator[WorkerProcess]:
    """A real `celery worker` (tests/support/processes.py), the broker purged around it;
    with `profile_dir`, its pool processes profiled by cProfile (bench/profiled_celery.py);
    `environ` on top of its environment (a setting of one contender)."""
    purge_broker()
    env, app = worker_env() | (environ or {}), "scheduler_site"
    if profile_dir is not None:
        env["BENCH_PROFILE_DIR"], app = str(profile_dir), "bench.profiled_celery"
    try:
        worker = WorkerProcess(
            f"{name}-{os.getpid()}", env, pool, concurrency,
            ready_seconds=WORKER_READY_SECONDS, app=app,
        )  # fmt: skip
    except AssertionError as exc:
        raise RuntimeError(str(exc)) from None
    log(f"worker {worker.name} ready (--pool {pool} --concurrency {concurrency})")
    try:
        yield worker
    finally:
        worker.stop()
        purge_broker()


def log_time(line: str) -> float | None:
    """Epoch seconds of a Celery log line's timestamp (local time, millisecond precision)."""
    match = LOG_TIME.match(line)
    if not match:
        return None
    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
    return stamp.timestamp() + int(match.group(2)) / 1000


def first_line_time(lines: list[str], start: int, needle: str) -> float | None:
    for line in lines[start:]:
        if needle in line:
            return log_time(line)
    return None


# --- database state --------------------------------------------------------------------------


def reset_scheduler(scheduler_id: str, threshold: int) -> None:
    """A fresh celery scheduler running demo.echo, with nothing in it."""
    from tasks import services
    from tasks.models import Scheduler

    clear_tasks(scheduler_id)
    Scheduler.objects.filter(id=scheduler_id).delete()
    services.scheduler_create(
        id=scheduler_id, kind="celery", handler=HANDLER, dispatch_threshold=threshold
    )


def clear_tasks(scheduler_id: str) -> None:
    from tasks.models import Task, TaskEvent

    TaskEvent.objects.filter(task__scheduler_id=scheduler_id).delete()
    Task.objects.filter(scheduler_id=scheduler_id).delete()


def vacuum_tasks() -> None:
    from django.db import connection

    from tasks.models import Task, TaskEvent

    if connection.vendor == "postgresql":
        vacuum(Task, TaskEvent)


def status_counts(scheduler_id: str) -> Counter[str]:
    from django.db.models import Count

    from tasks.models import Task

    rows = (
        Task.objects.filter(scheduler_id=scheduler_id).values_list("status").annotate(Count("id"))
    )
    return Counter({status: count for status, count in rows})


def seed_queued(scheduler_id: str, count: int) -> None:
    from tests.support import seed

    seed.seed_queued(scheduler_id, count, priority=0)


def events_of(scheduler_id: str) -> dict[str, dict[str, float]]:
    """task id → {to_status: first time it got there (epoch seconds)}."""
    from tasks.models import TaskEvent

    out: dict[str, dict[str, float]] = {}
    rows = TaskEvent.objects.filter(task__scheduler_id=scheduler_id).values_list(
        "task_id", "to_status", "at"
    )
    for task_id, to_status, at in rows.order_by("at", "id"):
        out.setdefault(str(task_id), {}).setdefault(to_status, at.timestamp())
    return out


def pg_sessions() -> int | None:
    """Sessions ever opened on this database (PostgreSQL 14+), after the statistics of the
    backends that just ended have been flushed; None elsewhere."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return None
    time.sleep(1.2)  # backends flush their statistics at most once a second, and on exit
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else None


def sessions_text(sessions: int | None, tasks: int) -> str:
    if sessions is None or not tasks:
        return "not known"
    return f"{sessions:,} ({sessions / tasks:.2f} a task)"


# --- CPU accounting from /proc ---------------------------------------------------------------


def redis_pid() -> int | None:
    import redis

    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
        return int(client.info("server")["process_id"])
    return None


@dataclass
class CpuWatch:
    """CPU seconds of each side of the pipeline over a measured window: the worker's process
    tree, PostgreSQL's (postmaster and every backend), Redis, this process."""

    roots: dict[str, int]
    start: dict[str, float] = field(default_factory=dict)
    machine_start: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def begin(cls, worker: WorkerProcess) -> CpuWatch:
        roots = {"worker": worker.process.pid, "bench": os.getpid()}
        for name, pid in (("postgres", postmaster_pid()), ("redis", redis_pid())):
            if pid:
                roots[name] = pid
        watch = cls(roots=roots)
        watch.start = watch.read()
        watch.machine_start = machine_cpu()
        return watch

    def read(self) -> dict[str, float]:
        return {
            name: process_cpu(pid, reaped=False) if name == "bench" else tree_cpu(pid)
            for name, pid in self.roots.items()
        }

    def end(self) -> dict[str, float]:
        now = self.read()
        out = {name: now[name] - self.start[name] for name in self.roots}
        busy, total = machine_cpu()
        out["machine_busy"] = busy - self.machine_start[0]
        out["machine_total"] = total - self.machine_start[1]
        return out


# --- results ---------------------------------------------------------------------------------


@dataclass
class Sample:
    push_start: float
    push_return: float
    queued: float
    dispatched: float
    received: float  # the worker's "received" log line; NaN when not found
    running: float
    completed: float
    rescued: bool  # the fast path did not dispatch it; the bench did

    @property
    def latency(self) -> float:
        return self.running - self.push_start


@dataclass
class LatencyResult:
    label: str
    database: str
    worker: str
    samples: list[Sample] = field(default_factory=list)
    lost: int = 0
    seconds: float = 0.0
    error: str = ""
    sessions: int | None = None  # PostgreSQL sessions opened over the leg, warm-up included

    def latencies_ms(self) -> list[float]:
        return [s.latency * 1000 for s in self.samples]


@dataclass
class ThroughputResult:
    tasks: int
    threshold: int
    started: float = 0.0
    wall: float = 0.0
    completed: int = 0
    unfinished: dict[str, int] = field(default_factory=dict)
    depth_samples: list[int] = field(default_factory=list)
    max_depth_events: int = 0
    events: dict[str, dict[str, float]] = field(default_factory=dict)
    body_seconds: list[float] = field(default_factory=list)  # run_task's time, worker log
    cpu: dict[str, float] = field(default_factory=dict)
    dispatch_calls: int = 0
    dispatched_by_bench: int = 0
    sessions: int | None = None  # PostgreSQL sessions opened over the measured window
    celery_schedulers: int = 0  # what each dispatch_all() visits
    statements: list[str] = field(default_factory=list)  # pg_stat_statements rows, --profile
    message_batch: int = 1  # DISPATCH_MESSAGE_BATCH of the run: tasks a message at most

    @property
    def rate(self) -> float:
        return self.completed / self.wall if self.wall > 0 else math.nan

    def completion_times(self) -> list[float]:
        return sorted(e["COMPLETED"] for e in self.events.values() if "COMPLETED" in e)

    def steady_rate(self) -> float:
        """Completions a second between the 10th and the 90th percentile completion."""
        times = self.completion_times()
        if len(times) < 20:
            return math.nan
        low, high = int(len(times) * 0.1), int(len(times) * 0.9)
        span = times[high] - times[low]
        return (high - low) / span if span > 0 else math.nan

    def step_ms(self, start: str, end: str) -> list[float]:
        return [(e[end] - e[start]) * 1000 for e in self.events.values() if start in e and end in e]

    def cpu_ms_per_task(self, name: str) -> float:
        return self.cpu.get(name, math.nan) / self.completed * 1000 if self.completed else math.nan


@dataclass
class FloorResult:
    """Celery's own cost: a built-in no-op task through the same kind of worker."""

    tasks: int
    wall: float = math.nan
    completed: int = 0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.completed / self.wall if self.wall > 0 else math.nan

    def cpu_ms_per_task(self, name: str) -> float:
        return self.cpu.get(name, math.nan) / self.completed * 1000 if self.completed else math.nan


@dataclass
class Run:
    args: argparse.Namespace
    started: float = field(default_factory=time.monotonic)
    load_start: str = ""
    versions: str = ""
    latency: list[LatencyResult] = field(default_factory=list)
    # One entry a round, in the order they ran (A B C A B C ...).
    throughput: list[ThroughputResult] = field(default_factory=list)
    floor: list[FloorResult] = field(default_factory=list)
    peer: list[FloorResult] = field(default_factory=list)  # procrastinate's worker
    # Ours with one setting changed, run right after ours in each round: the before/after of
    # a design change (bench.worker_bench.VARIANTS), by the variant's label.
    variants: dict[str, list[ThroughputResult]] = field(default_factory=dict)
    loads: list[str] = field(default_factory=list)  # the load average after each round
    profile: str = ""  # the worker's pool processes' top functions, --profile
    notes: list[str] = field(default_factory=list)
