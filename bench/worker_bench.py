"""The Celery execution path: push → RUNNING latency at idle, and no-op throughput.

    scripts/with-postgres.sh --required -- scripts/with-redis.sh --required -- \\
        .venv/bin/python -m bench.worker_bench [--quick]

(`make bench-worker` runs it with the defaults.) It writes to the database in DATABASE_URL,
which must be a throwaway PostgreSQL database, and uses the Redis in TEST_REDIS_URL as the
broker. Real `celery -A scheduler_site worker` processes run the tasks, started as the
end-to-end tests start them; nothing is eager or mocked.

- Latency: one worker (`--pool solo`), a celery scheduler with `demo.echo`; one task at a time
  pushed with `services.task_push` (whose on-commit fast path dispatches it), from the start of
  the push call to the task's RUNNING event, with a random 50-200 ms pause after each task
  finished so the worker is idle at every push. Each sample is split into steps from its
  TaskEvent rows, the time the push call returned and the worker's "received" log line. The
  same again on the embedded default of `make run` (SQLite in a file, kombu's filesystem
  broker), in a child process with its own temporary folder, unless --no-embedded.
- Throughput: one worker with `--pool prefork --concurrency 2`, a celery scheduler with
  `demo.echo` and dispatch_threshold 50; N QUEUED tasks bulk-created, then
  `dispatch.dispatch_all()` every DISPATCH_INTERVAL_SECONDS from this process (the periodic
  dispatcher's job, at its production cadence) while the worker's on-claim fast path keeps the
  broker topped up; from the first dispatch to the last COMPLETED event. The broker's depth
  (DISPATCHED tasks) is sampled every 100 ms, and also replayed exactly from the events.
- Celery floor: the built-in no-op `celery.accumulate` through the same kind of worker, so the
  throughput can be read against what Celery and Redis alone manage on this machine.

Where the time goes: per-step times from the events and the worker's log, CPU per task of the
worker, PostgreSQL (every backend, short-lived ones too), Redis and this process from /proc,
and the PostgreSQL sessions opened per task.

Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
RESULT_FILE = RESULTS_DIR / "worker_bench.md"
CELERY = str(Path(sys.executable).with_name("celery"))
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

WORKER_SECRET_KEY = secrets.token_urlsafe(48)  # DEBUG-off workers need one; never stored

TARGET_P50_MS = 200.0
TARGET_P99_MS = 1000.0
TARGET_RATE = 300.0

LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}):")
SUCCEEDED = re.compile(r"succeeded in ([0-9.]+)s")


# --- settings --------------------------------------------------------------------------------


def configure_environment() -> None:
    """PostgreSQL + Redis settings for the settings module, before django.setup()."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "scheduler_site.settings"
    os.environ["DEBUG"] = "1"
    url = os.environ.get("DATABASE_URL", "")
    redis_url = os.environ.get("TEST_REDIS_URL", "")
    problems = []
    if not url.startswith(("postgres://", "postgresql://", "pgsql://")):
        problems.append(
            f"DATABASE_URL must point at a throwaway PostgreSQL database (got {url or 'nothing'!r})"
        )
    if not redis_url.startswith(("redis://", "rediss://")):
        problems.append(f"TEST_REDIS_URL must point at a Redis (got {redis_url or 'nothing'!r})")
    if problems:
        sys.exit(
            "worker_bench: " + "; ".join(problems) + ". Run it as `make bench-worker`, or\n"
            "  scripts/with-postgres.sh --required -- scripts/with-redis.sh --required -- "
            ".venv/bin/python -m bench.worker_bench"
        )
    os.environ["CELERY_BROKER_URL"] = redis_url


def embedded_environment(folder: Path) -> dict[str, str]:
    """The environment of the embedded leg's child: `make run`'s SQLite file and filesystem
    broker, in a temporary folder of its own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "CELERY_BROKER_URL", "TEST_REDIS_URL"}
    }
    env.update(
        DJANGO_SETTINGS_MODULE="scheduler_site.settings",
        DEBUG="1",
        SCHEDULER_VAR_DIR=str(folder),
        DATABASE_URL=f"sqlite:///{folder / 'scheduler.sqlite3'}",
        CELERY_BROKER_URL="filesystem://",
        SCHEDULER_BROKER_DIR=str(folder / "broker"),
    )
    return env


def setup_django(vendor: str) -> None:
    import django
    from django.core.management import call_command
    from django.db import connection

    django.setup()
    if connection.vendor != vendor:
        sys.exit(f"worker_bench: needs {vendor}, DATABASE_URL gives {connection.vendor}.")
    call_command("migrate", verbosity=0, interactive=False)


def worker_env() -> dict[str, str]:
    """What tests/e2e/conftest.py gives its workers, but as production runs them: DEBUG off
    (with DEBUG on, Django renders and keeps every query's SQL, a cost production does not
    pay), so with a throwaway SECRET_KEY made for this run."""
    from django.conf import settings

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings",
        "DEBUG": "0",
        "SECRET_KEY": WORKER_SECRET_KEY,
        "ALLOWED_HOSTS": "localhost",
        "DATABASE_URL": os.environ["DATABASE_URL"],
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "SCHEDULER_BROKER_DIR": str(settings.CELERY_BROKER_DIR),
    }
    env.pop("WORKER_HEARTBEAT_SECONDS", None)  # the default
    return env


# --- worker processes ------------------------------------------------------------------------


class Worker:
    """`celery -A scheduler_site worker`, its output read line by line by a thread."""

    def __init__(self, name: str, *, pool: str, concurrency: int) -> None:
        self.name = f"{name}-{os.getpid()}"
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.process = subprocess.Popen(
            [
                CELERY,
                "-A",
                "scheduler_site",
                "worker",
                "-l",
                "INFO",
                "-n",
                f"{self.name}@%h",
                "--pool",
                pool,
                "--concurrency",
                str(concurrency),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env=worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(WORKER_READY_SECONDS):
            self.stop()
            tail = "\n".join(self.lines[-40:])
            raise RuntimeError(f"worker {self.name} did not start:\n{tail}")
        log(f"worker {self.name} ready (--pool {pool} --concurrency {concurrency})")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if " ready." in line:
                self.ready.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def running_worker(name: str, *, pool: str, concurrency: int) -> Any:
    purge_broker()
    worker = Worker(name, pool=pool, concurrency=concurrency)
    try:
        yield worker
    finally:
        worker.stop()
        purge_broker()


def purge_broker() -> None:
    from scheduler_site.celery import app

    # An empty filesystem broker folder may not exist yet: nothing to purge then.
    with contextlib.suppress(Exception):
        app.control.purge()


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


def vacuum() -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE tasks_task")
        cursor.execute("VACUUM ANALYZE tasks_taskevent")


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


def database_version() -> str:
    from django.db import connection

    if connection.vendor == "sqlite":
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return f"PostgreSQL {cursor.fetchone()[0]}"


# --- CPU accounting from /proc ---------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int, *, reaped: bool = True) -> float:
    """CPU seconds of a process (and of the children it has reaped); 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # utime, stime, then cutime, cstime: what its reaped children used.
    return sum(int(value) for value in fields[11 : 15 if reaped else 13]) / TICK


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree_cpu(root: int) -> float:
    """CPU seconds of a process tree: every live process in it, with what each has reaped.
    A child that exits moves its time into its parent's reaped time, so nothing is lost or
    counted twice between two readings (PostgreSQL forks a backend per connection)."""
    total, pending = 0.0, [root]
    while pending:
        pid = pending.pop()
        total += process_cpu(pid)
        pending.extend(child_pids(pid))
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    total = sum(values)
    return (total - values[3] - values[4]) / TICK, total / TICK  # minus idle and iowait


def postmaster_pid() -> int | None:
    """The local PostgreSQL's postmaster: the parent of this connection's backend."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return parent_pid(cursor.fetchone()[0])


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
    def begin(cls, worker: Worker) -> CpuWatch:
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


# --- latency ---------------------------------------------------------------------------------


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


def wait_finished(task_id: Any) -> tuple[str, bool]:
    """Poll until the task is finished; (its status, whether the bench had to dispatch it)."""
    from tasks import dispatch
    from tasks.models import Task

    started = time.monotonic()
    rescued = False
    status = ""
    while time.monotonic() - started < SAMPLE_TIMEOUT_SECONDS:
        status = Task.objects.filter(id=task_id).values_list("status", flat=True).first() or ""
        if status in {"COMPLETED", "FAILED", "DEAD", "CANCELLED"}:
            return status, rescued
        if status == "QUEUED" and not rescued and time.monotonic() - started > RESCUE_AFTER_SECONDS:
            dispatch.dispatch_all()
            rescued = True
        time.sleep(POLL_SECONDS)
    return status or "gone", rescued


def push_one(worker: Worker, n: int) -> Sample | None:
    from tasks import services

    mark = len(worker.lines)
    push_start = time.time()
    task = services.task_push(scheduler_id=LATENCY_SCHEDULER, data={"n": n}, actor="bench")
    push_return = time.time()
    status, rescued = wait_finished(task.id)
    steps = events_of_task(task.id)
    if status != "COMPLETED" or not {"QUEUED", "DISPATCHED", "RUNNING", "COMPLETED"} <= set(steps):
        log(f"sample {n}: task {task.id} ended {status}, events {sorted(steps)}")
        return None
    received = first_line_time(worker.lines, mark, " received")
    return Sample(
        push_start=push_start,
        push_return=push_return,
        queued=steps["QUEUED"],
        dispatched=steps["DISPATCHED"],
        received=math.nan if received is None else received,
        running=steps["RUNNING"],
        completed=steps["COMPLETED"],
        rescued=rescued,
    )


def events_of_task(task_id: Any) -> dict[str, float]:
    from tasks.models import TaskEvent

    out: dict[str, float] = {}
    rows = TaskEvent.objects.filter(task_id=task_id).order_by("at", "id")
    for to_status, at in rows.values_list("to_status", "at"):
        out.setdefault(to_status, at.timestamp())
    return out


def measure_latency(label: str, samples: int) -> LatencyResult:
    from django.db import connection

    reset_scheduler(LATENCY_SCHEDULER, threshold=10)
    result = LatencyResult(label, database_version(), "1 process (--pool solo)")
    rng = random.Random(20_240_601)
    started = time.monotonic()
    sessions_before = pg_sessions()
    with running_worker("latency", pool="solo", concurrency=1) as worker:
        for n in range(-LATENCY_WARMUP, samples):
            sample = push_one(worker, n)
            if n >= 0:
                if sample is None:
                    result.lost += 1
                else:
                    result.samples.append(sample)
            if n >= 0 and (n + 1) % 50 == 0:
                log(f"{label}: {n + 1}/{samples} pushes")
            time.sleep(rng.uniform(*PAUSE_SECONDS))
    result.seconds = time.monotonic() - started
    sessions_after = pg_sessions()
    if sessions_before is not None and sessions_after is not None:
        result.sessions = sessions_after - sessions_before
    clear_tasks(LATENCY_SCHEDULER)
    connection.close()
    lat = result.latencies_ms()
    if lat:
        log(
            f"{label}: push → RUNNING p50 {percentile(lat, 0.5):.1f} ms, "
            f"p99 {percentile(lat, 0.99):.1f} ms over {len(lat)} samples"
        )
    return result


def run_embedded_leg(samples: int) -> LatencyResult:
    """The latency leg on `make run`'s embedded default, in a child with its own settings."""
    label = "SQLite + filesystem broker"
    with tempfile.TemporaryDirectory(prefix="worker-bench-") as folder:
        out = Path(folder) / "result.json"
        command = [
            sys.executable,
            "-m",
            "bench.worker_bench",
            "--embedded-child",
            str(out),
            "--samples",
            str(samples),
        ]
        env = embedded_environment(Path(folder))
        done = subprocess.run(command, cwd=ROOT, env=env, check=False)
        if done.returncode != 0 or not out.exists():
            return LatencyResult(
                label, "SQLite", "-", error=f"the child exited {done.returncode}; see above"
            )
        data = json.loads(out.read_text())
    result = LatencyResult(**{k: v for k, v in data.items() if k != "samples"})
    result.samples = [Sample(**s) for s in data["samples"]]
    return result


def embedded_child(out: Path, samples: int) -> int:
    from django.conf import settings

    if not settings.CELERY_BROKER_URL.startswith("filesystem://"):
        sys.exit("worker_bench: the embedded leg runs on the filesystem broker.")
    result = measure_latency("SQLite + filesystem broker", samples)
    out.write_text(json.dumps(asdict(result)))
    return 0


# --- throughput ------------------------------------------------------------------------------


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


def replay_broker_depth(events: dict[str, dict[str, float]]) -> int:
    """Most tasks DISPATCHED but not yet RUNNING at once, from the event times."""
    changes = []
    for steps in events.values():
        if "DISPATCHED" in steps:
            changes.append((steps["DISPATCHED"], 1))
        if "RUNNING" in steps:
            changes.append((steps["RUNNING"], -1))
    depth = deepest = 0
    for _at, change in sorted(changes, key=lambda c: (c[0], c[1])):
        depth += change
        deepest = max(deepest, depth)
    return deepest


def drain(count: int, timeout: float) -> tuple[float, list[int], int, int, str]:
    """Run the periodic dispatcher at its production cadence (DISPATCH_INTERVAL_SECONDS, as
    beat would) until `count` tasks finished, checking every POLL_DEPTH_SECONDS; (start, depth
    samples, dispatch calls, tasks the bench dispatched, problem). Between rounds the worker's
    on-claim fast path keeps the broker topped up, as in production."""
    from django.conf import settings

    from tasks import dispatch

    depths: list[int] = []
    calls = sent = 0
    started = time.time()
    next_dispatch = tick = time.monotonic()
    while True:
        if time.monotonic() >= next_dispatch:
            sent += sum(dispatch.dispatch_all().values())
            calls += 1
            next_dispatch += settings.DISPATCH_INTERVAL_SECONDS
        counts = status_counts(THROUGHPUT_SCHEDULER)
        depths.append(counts.get("DISPATCHED", 0))
        finished = sum(counts[s] for s in ("COMPLETED", "FAILED", "DEAD", "CANCELLED"))
        if finished >= count:
            return started, depths, calls, sent, ""
        if time.time() - started > timeout:
            return started, depths, calls, sent, f"timed out after {timeout:.0f} s: {counts}"
        tick += POLL_DEPTH_SECONDS
        time.sleep(max(0.0, tick - time.monotonic()))


def measure_throughput(count: int, threshold: int) -> tuple[ThroughputResult, list[str]]:
    from tasks.models import Scheduler

    notes: list[str] = []
    reset_scheduler(THROUGHPUT_SCHEDULER, threshold=threshold)
    result = ThroughputResult(tasks=count, threshold=threshold)
    timeout = max(120.0, count / 20)
    with running_worker("throughput", pool="prefork", concurrency=THROUGHPUT_CONCURRENCY) as w:
        # Warm-up: both pool processes import everything and open their connections.
        seed_queued(THROUGHPUT_SCHEDULER, THROUGHPUT_WARMUP)
        *_, problem = drain(THROUGHPUT_WARMUP, timeout)
        if problem:
            notes.append(f"warm-up: {problem}")
        clear_tasks(THROUGHPUT_SCHEDULER)
        seed_queued(THROUGHPUT_SCHEDULER, count)
        vacuum()
        log(f"throughput: {count:,} tasks queued; dispatching")
        mark = len(w.lines)
        sessions_before = pg_sessions()
        watch = CpuWatch.begin(w)
        started, depths, calls, sent, problem = drain(count, timeout)
        result.cpu = watch.end()
        if problem:
            notes.append(f"throughput: {problem}")
        result.body_seconds = [
            float(m.group(1)) for line in w.lines[mark:] if (m := SUCCEEDED.search(line))
        ]
    sessions_after = pg_sessions()  # the worker has stopped: its backends flushed theirs
    if sessions_before is not None and sessions_after is not None:
        result.sessions = sessions_after - sessions_before
    result.celery_schedulers = Scheduler.objects.filter(kind="celery", paused=False).count()
    result.started, result.depth_samples = started, depths
    result.dispatch_calls, result.dispatched_by_bench = calls, sent
    result.events = events_of(THROUGHPUT_SCHEDULER)
    counts = status_counts(THROUGHPUT_SCHEDULER)
    result.completed = counts.get("COMPLETED", 0)
    result.unfinished = {s: n for s, n in counts.items() if s != "COMPLETED"}
    times = result.completion_times()
    result.wall = (times[-1] - started) if times else math.nan
    result.max_depth_events = replay_broker_depth(result.events)
    log(
        f"throughput: {result.completed:,} completed in {result.wall:.2f} s, "
        f"{result.rate:,.0f} tasks/s; deepest broker {max(depths, default=0)} sampled, "
        f"{result.max_depth_events} from events"
    )
    return result, notes


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


def send_noops(count: int) -> None:
    from scheduler_site.celery import app

    noop = app.tasks[NOOP_TASK]
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            noop.apply_async(producer=producer)


def wait_succeeded(worker: Worker, start: int, count: int, timeout: float) -> list[float]:
    """Log times of the first `count` no-op successes after line `start`; fewer on timeout."""
    times: list[float] = []
    seen = start
    deadline = time.monotonic() + timeout
    while len(times) < count and time.monotonic() < deadline:
        lines = worker.lines[seen:]
        seen += len(lines)
        for line in lines:
            if NOOP_TASK in line and " succeeded in " in line:
                stamp = log_time(line)
                if stamp is not None:
                    times.append(stamp)
        time.sleep(POLL_DEPTH_SECONDS)
    return times


def measure_celery_floor(count: int) -> FloorResult:
    """`celery.accumulate` (returns its arguments; touches no database) sent `count` times as
    fast as one producer can, through a worker like the throughput leg's."""
    result = FloorResult(tasks=count)
    with running_worker("floor", pool="prefork", concurrency=THROUGHPUT_CONCURRENCY) as w:
        mark = len(w.lines)
        send_noops(THROUGHPUT_WARMUP)
        wait_succeeded(w, mark, THROUGHPUT_WARMUP, 60)
        mark = len(w.lines)
        watch = CpuWatch.begin(w)
        started = time.time()
        send_noops(count)
        times = wait_succeeded(w, mark, count, max(60.0, count / 20))
        result.cpu = watch.end()
    result.completed = len(times)
    result.wall = max(times) - started if times else math.nan
    log(
        f"Celery floor: {result.completed:,} no-op tasks in {result.wall:.2f} s, "
        f"{result.rate:,.0f} tasks/s"
    )
    return result


# --- report ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def uptime() -> str:
    try:
        done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    except OSError:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return done.stdout.strip()


def percentile(values: list[float], fraction: float) -> float:
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return math.nan
    return clean[min(len(clean) - 1, int(fraction * len(clean)))]


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def latency_table(results: list[LatencyResult]) -> list[str]:
    lines = [
        "| database + broker | worker | samples | p50 ms | p90 ms | p99 ms | max ms "
        "| fast path missed | PostgreSQL sessions opened |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.error:
            error = (r.error.splitlines() or [""])[0][:160].replace("|", "/")
            lines.append(f"| {r.label} | - | 0 | - | - | - | - | - | {error} |")
            continue
        lat = r.latencies_ms()
        missed = sum(s.rescued for s in r.samples)
        lost = f" ({r.lost} lost)" if r.lost else ""
        lines.append(
            f"| {r.label} ({r.database}) | {r.worker} | {len(lat)}{lost} "
            f"| {fmt(percentile(lat, 0.5))} | {fmt(percentile(lat, 0.9))} "
            f"| {fmt(percentile(lat, 0.99))} | {fmt(max(lat, default=math.nan))} | {missed} "
            f"| {sessions_text(r.sessions, len(r.samples) + r.lost + LATENCY_WARMUP)} |"
        )
    return lines


LATENCY_STEPS = (
    ("push start → DISPATCHED event", lambda s: s.dispatched - s.push_start),
    ("DISPATCHED → push returned (commit, send)", lambda s: s.push_return - s.dispatched),
    ("push returned → worker received", lambda s: s.received - s.push_return),
    ("worker received → RUNNING event", lambda s: s.running - s.received),
    ("RUNNING → COMPLETED", lambda s: s.completed - s.running),
)


def latency_steps_table(results: list[LatencyResult]) -> list[str]:
    measured = [r for r in results if r.samples]
    if not measured:
        return []
    lines = [
        "| step, ms (p50 / p90 / p99) | " + " | ".join(r.label for r in measured) + " |",
        "|---|" + "---:|" * len(measured),
    ]
    for name, step in LATENCY_STEPS:
        cells = []
        for r in measured:
            values = [step(s) * 1000 for s in r.samples]
            cells.append(
                f"{fmt(percentile(values, 0.5))} / {fmt(percentile(values, 0.9))} "
                f"/ {fmt(percentile(values, 0.99))}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def throughput_table(t: ThroughputResult | None, floor: FloorResult | None) -> list[str]:
    worker = f"1 worker, --pool prefork --concurrency {THROUGHPUT_CONCURRENCY}"
    lines = [
        "| tasks | what runs | dispatch_threshold | wall s | tasks/s | steady tasks/s (10-90 %) "
        "| deepest broker, sampled | deepest broker, from events | not completed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    if t is not None:
        unfinished = ", ".join(f"{s} {n}" for s, n in sorted(t.unfinished.items())) or "none"
        lines.append(
            f"| {t.tasks:,} | `{HANDLER}` via `tasks.run_task`, {worker} | {t.threshold} "
            f"| {fmt(t.wall, 2)} | {fmt(t.rate, 0)} | {fmt(t.steady_rate(), 0)} "
            f"| {max(t.depth_samples, default=0)} | {t.max_depth_events} | {unfinished} |"
        )
    if floor is not None:
        missing = floor.tasks - floor.completed
        lines.append(
            f"| {floor.tasks:,} | Celery floor: `{NOOP_TASK}` (no database), {worker} | - "
            f"| {fmt(floor.wall, 2)} | {fmt(floor.rate, 0)} | - | - | - "
            f"| {f'{missing:,} not seen' if missing else 'none'} |"
        )
    return lines


def throughput_steps_table(t: ThroughputResult) -> list[str]:
    service_ms = THROUGHPUT_CONCURRENCY * t.wall / t.completed * 1000 if t.completed else math.nan
    rows = [
        ("DISPATCHED → RUNNING (waiting in the broker)", t.step_ms("DISPATCHED", "RUNNING")),
        ("RUNNING → COMPLETED (claimed to reported)", t.step_ms("RUNNING", "COMPLETED")),
        ("run_task body (worker log, `succeeded in`)", [s * 1000 for s in t.body_seconds]),
    ]
    lines = ["| per task | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|"]
    for name, values in rows:
        lines.append(
            f"| {name} | {fmt(percentile(values, 0.5), 2)} | {fmt(percentile(values, 0.9), 2)} "
            f"| {fmt(percentile(values, 0.99), 2)} |"
        )
    lines.append(
        f"| wall time per task per pool process ({THROUGHPUT_CONCURRENCY} x wall / tasks) "
        f"| {fmt(service_ms, 2)} | | |"
    )
    return lines


SIDES = ("worker", "postgres", "redis", "bench")


def cpu_row(label: str, cpu: dict[str, float], completed: int) -> str:
    def per_task(name: str) -> str:
        return fmt(cpu[name] / completed * 1000, 2) if name in cpu and completed else "-"

    pipeline = sum(cpu.get(s, 0.0) for s in SIDES[:3])
    accounted = pipeline + cpu.get("bench", 0.0)
    total = cpu.get("machine_total", math.nan)
    other = max(0.0, cpu.get("machine_busy", 0.0) - accounted) / total if total > 0 else math.nan
    cpus = os.cpu_count() or 1
    ceiling = cpus * completed / accounted if accounted else math.nan
    ceiling_pipeline = cpus * completed / pipeline if pipeline else math.nan
    return (
        f"| {label} | {per_task('worker')} | {per_task('postgres')} | {per_task('redis')} "
        f"| {per_task('bench')} | {fmt(other * 100, 0)} | {fmt(ceiling, 0)} "
        f"| {fmt(ceiling_pipeline, 0)} |"
    )


def cpu_table(t: ThroughputResult | None, floor: FloorResult | None) -> list[str]:
    lines = [
        "| run | worker (main + pool) | PostgreSQL (all backends) | Redis "
        "| bench (dispatcher, polling; or producer) | other work on the machine % "
        "| CPU-bound ceiling tasks/s | same, worker + PostgreSQL + Redis only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if t is not None:
        lines.append(cpu_row(f"`{HANDLER}`", t.cpu, t.completed))
    if floor is not None:
        lines.append(cpu_row("Celery floor", floor.cpu, floor.completed))
    return lines


def target_row(figure: str, target: str, measured: float, unit: str, met: bool) -> str:
    value = "-" if math.isnan(measured) else f"{measured:,.0f} {unit}"
    return f"| {figure} | {target} | {value} | {'yes' if met else 'NO'} |"


def targets_table(latency: list[LatencyResult], t: ThroughputResult | None) -> list[str]:
    lines = ["| figure | target | measured | met |", "|---|---:|---:|---|"]
    for r in latency:
        lat = r.latencies_ms()
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        lines.append(
            target_row(
                f"push → RUNNING p50, {r.label}",
                f"≤ {TARGET_P50_MS:g} ms",
                p50,
                "ms",
                p50 <= TARGET_P50_MS,
            )
        )
        lines.append(
            target_row(
                f"push → RUNNING p99, {r.label}",
                f"≤ {TARGET_P99_MS:g} ms",
                p99,
                "ms",
                p99 <= TARGET_P99_MS,
            )
        )
    if t is not None:
        lines.append(
            target_row(
                f"no-op tasks/s, {THROUGHPUT_CONCURRENCY} worker processes, PostgreSQL + Redis",
                f"≥ {TARGET_RATE:g}",
                t.rate,
                "tasks/s",
                t.rate >= TARGET_RATE,
            )
        )
    return lines


def observations(run: Run) -> list[str]:
    """What the figures say about themselves: connection churn, and the CPU cost per task
    against what the throughput target allows on this machine."""
    notes = []
    t, floor = run.throughput, run.floor
    churn = [
        (r.label, r.sessions / (len(r.samples) + r.lost + LATENCY_WARMUP))
        for r in run.latency
        if r.sessions is not None and r.samples
    ]
    if t is not None and t.sessions is not None and t.completed:
        churn.append(("throughput", t.sessions / t.completed))
    if any(per_task >= 0.5 for _label, per_task in churn):
        where = ", ".join(f"{label} {per_task:.2f}" for label, per_task in churn)
        notes.append(
            f"PostgreSQL sessions opened per task: {where}. Celery's Django fixup closes every "
            "database connection before and after each task unless CELERY_DB_REUSE_MAX is set, "
            "so each task pays a new connection (a backend forked and warmed up) whatever "
            "CONN_MAX_AGE says."
        )
    if t is not None and t.completed and t.rate < TARGET_RATE:
        cpus = os.cpu_count() or 1
        pipeline = sum(t.cpu.get(side, 0.0) for side in SIDES[:3]) / t.completed * 1000
        budget = cpus * 1000 / TARGET_RATE
        floor_ms = (
            sum(floor.cpu.get(side, 0.0) for side in SIDES[:3]) / floor.completed * 1000
            if floor is not None and floor.completed
            else math.nan
        )
        notes.append(
            f"CPU per task: worker + PostgreSQL + Redis used {pipeline:.1f} CPU ms a "
            f"task, which caps {cpus} CPUs at {cpus * 1000 / pipeline:,.0f} tasks/s with nothing "
            f"else running; {TARGET_RATE:g} tasks/s allows {budget:.1f} ms a task, of which "
            f"Celery itself (the floor) takes {fmt(floor_ms, 1)} ms."
        )
    return notes


@dataclass
class Run:
    args: argparse.Namespace
    started: float = field(default_factory=time.monotonic)
    load_start: str = ""
    versions: str = ""
    latency: list[LatencyResult] = field(default_factory=list)
    throughput: ThroughputResult | None = None
    floor: FloorResult | None = None
    notes: list[str] = field(default_factory=list)


def report(run: Run) -> str:
    import celery
    import django
    from django.conf import settings

    args = run.args
    lines = [
        "# Celery execution path benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {run.versions}, Django {django.get_version()}, "
        f"Celery {celery.__version__}, {os.cpu_count()} CPUs, DEBUG off in the workers "
        f"(on in the bench), handler `{HANDLER}`; total {time.monotonic() - run.started:.0f} s.",
        "",
        f"Load at the start: `{run.load_start}`; at the end: `{uptime()}`. Other work on the "
        "machine depresses every figure.",
        "",
        "## Push → RUNNING latency at idle, one worker",
        "",
        *latency_table(run.latency),
        "",
        f"From the start of the `services.task_push` call (whose on-commit fast path dispatches) "
        f"to the task's RUNNING event, one task at a time, a random "
        f"{PAUSE_SECONDS[0] * 1000:.0f}-{PAUSE_SECONDS[1] * 1000:.0f} ms pause after each one "
        f"finished; {LATENCY_WARMUP} warm-up pushes not counted. Fast path missed = still QUEUED "
        f"after {RESCUE_AFTER_SECONDS:g} s, dispatched by the bench. Sessions: connections "
        "PostgreSQL accepted over the leg (from pg_stat_database), per push.",
        "",
        "### Where the latency goes",
        "",
        *latency_steps_table(run.latency),
        "",
        "Event times are taken by the service before its UPDATE, in the process that makes it; "
        "`received` is the worker's Celery log line (millisecond stamps), so the two steps "
        "around it are ±1 ms.",
    ]
    t, floor = run.throughput, run.floor
    if t is not None or floor is not None:
        lines += [
            "",
            "## Throughput of no-op tasks, PostgreSQL + Redis",
            "",
            *throughput_table(t, floor),
            "",
        ]
    if t is not None:
        lines += [
            f"{t.tasks:,} QUEUED tasks bulk-created, then `dispatch.dispatch_all()` every "
            f"{settings.DISPATCH_INTERVAL_SECONDS} s (DISPATCH_INTERVAL_SECONDS, the production "
            f"cadence) from the bench ({t.dispatch_calls} calls, "
            f"each visiting the {t.celery_schedulers} unpaused celery schedulers, the pilots' "
            "included; "
            f"{t.dispatched_by_bench:,} tasks sent by them; the rest by the worker's on-claim "
            "fast path); wall = first dispatch to the last COMPLETED event. Deepest broker = "
            "most DISPATCHED tasks at once: sampled by the bench every "
            f"{POLL_DEPTH_SECONDS * 1000:.0f} ms, and replayed "
            "from the DISPATCHED and RUNNING events. PostgreSQL sessions opened meanwhile: "
            f"{sessions_text(t.sessions, t.completed)}.",
        ]
    if floor is not None:
        lines += [
            "",
            f"Celery floor: `{NOOP_TASK}` (a built-in task that returns its arguments) sent "
            f"{floor.tasks:,} times by one producer, through the same kind of worker; from the "
            "first send to the last `succeeded` log line. What Celery and Redis cost on this "
            "machine before any of our code runs.",
        ]
    if t is not None:
        lines += [
            "",
            "### Where the time goes",
            "",
            *throughput_steps_table(t),
            "",
            "CPU ms per task over the measured window, from /proc (process trees, so the "
            "PostgreSQL backends forked and gone meanwhile count too):",
            "",
            *cpu_table(t, floor),
            "",
            "CPU-bound ceiling = tasks/s if all CPUs did nothing but these processes' work. "
            "The bench's CPU is its dispatcher (as beat's periodic job would run it) and its "
            f"status poll every {POLL_DEPTH_SECONDS * 1000:.0f} ms.",
        ]
    lines += ["", "## Targets", "", *targets_table(run.latency, t)]
    notes = [*run.notes, *observations(run)]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    lines += [
        "",
        f"Run: `python -m bench.worker_bench{' --quick' if args.quick else ''}` "
        f"({args.samples} latency samples, {args.tasks:,} throughput tasks).",
    ]
    return "\n".join(lines) + "\n"


# --- the run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="latency samples a leg")
    parser.add_argument("--tasks", type=int, default=3_000, help="throughput tasks")
    parser.add_argument("--threshold", type=int, default=50, help="throughput dispatch_threshold")
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 samples, 500 tasks")
    parser.add_argument(
        "--no-embedded", action="store_true", help="skip the SQLite + filesystem broker leg"
    )
    parser.add_argument("--embedded-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.tasks = 30, 500
    if args.samples < 1 or args.tasks < 1 or args.threshold < 1:
        parser.error("--samples, --tasks and --threshold must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.embedded_child:
        os.environ["DEBUG"] = "1"
        setup_django("sqlite")
        return embedded_child(args.embedded_child, args.samples)
    configure_environment()
    setup_django("postgresql")
    run = Run(args=args, load_start=uptime(), versions=database_version() + ", Redis")
    log(f"{run.versions}; {run.load_start}")
    try:
        run.latency.append(measure_latency("PostgreSQL + Redis", args.samples))
    except RuntimeError as exc:
        run.latency.append(LatencyResult("PostgreSQL + Redis", run.versions, "-", error=str(exc)))
    try:
        run.throughput, notes = measure_throughput(args.tasks, args.threshold)
        run.notes += notes
    except RuntimeError as exc:
        run.notes.append(f"throughput leg failed: {exc}".replace("\n", " / ")[:2000])
    try:
        run.floor = measure_celery_floor(args.tasks)
    except RuntimeError as exc:
        run.notes.append(f"Celery floor failed: {exc}".replace("\n", " / ")[:2000])
    if not args.no_embedded:
        log("embedded leg: SQLite + filesystem broker, in a child process")
        run.latency.append(run_embedded_leg(args.samples))
    text = report(run)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(text)
    print("\n" + text)
    log(f"written to {RESULT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
