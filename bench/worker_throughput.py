"""The worker bench's throughput legs: no-op tasks through our Celery path, and Celery's own
floor (a built-in no-op through the same kind of worker)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from bench.common import log
from bench.worker_setup import (
    NOOP_TASK,
    POLL_DEPTH_SECONDS,
    SUCCEEDED,
    THROUGHPUT_CONCURRENCY,
    THROUGHPUT_SCHEDULER,
    THROUGHPUT_WARMUP,
    CpuWatch,
    FloorResult,
    ThroughputResult,
    clear_tasks,
    events_of,
    log_time,
    pg_sessions,
    reset_scheduler,
    running_worker,
    seed_queued,
    status_counts,
    vacuum_tasks,
)
from tests.support.processes import WorkerProcess


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


def measure_throughput(
    count: int,
    threshold: int,
    warmup: int = THROUGHPUT_WARMUP,
    profile_dir: Path | None = None,
    message_batch: int | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[ThroughputResult, list[str]]:
    """Ours; with `message_batch`, DISPATCH_MESSAGE_BATCH set to it in this process (the
    periodic dispatcher's rounds) and in the worker (its refills), else the settings';
    `environ` on top of the worker's environment (a worker-side setting of a variant)."""
    from django.conf import settings

    saved = settings.DISPATCH_MESSAGE_BATCH
    if message_batch is not None:
        settings.DISPATCH_MESSAGE_BATCH = message_batch
    try:
        return _measure_throughput(count, threshold, warmup, profile_dir, environ or {})
    finally:
        settings.DISPATCH_MESSAGE_BATCH = saved


def _measure_throughput(
    count: int, threshold: int, warmup: int, profile_dir: Path | None, environ: dict[str, str]
) -> tuple[ThroughputResult, list[str]]:
    from django.conf import settings

    from tasks.models import Scheduler

    notes: list[str] = []
    reset_scheduler(THROUGHPUT_SCHEDULER, threshold=threshold)
    result = ThroughputResult(tasks=count, threshold=threshold)
    result.message_batch = settings.DISPATCH_MESSAGE_BATCH
    timeout = max(120.0, count / 20)
    with running_worker(
        "throughput",
        pool="prefork",
        concurrency=THROUGHPUT_CONCURRENCY,
        profile_dir=profile_dir,
        environ={"DISPATCH_MESSAGE_BATCH": str(result.message_batch), **environ},
    ) as w:
        # Warm-up: both pool processes import everything and open their connections.
        seed_queued(THROUGHPUT_SCHEDULER, warmup)
        *_, problem = drain(warmup, timeout)
        if problem:
            notes.append(f"warm-up: {problem}")
        clear_tasks(THROUGHPUT_SCHEDULER)
        seed_queued(THROUGHPUT_SCHEDULER, count)
        vacuum_tasks()
        log(f"throughput: {count:,} tasks queued; dispatching")
        mark = len(w.lines)
        sessions_before = pg_sessions()
        statements_reset()
        watch = CpuWatch.begin(w)
        started, depths, calls, sent, problem = drain(count, timeout)
        result.cpu = watch.end()
        result.statements = statement_costs(count)
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


def _has_statements() -> bool:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('shared_preload_libraries', true)")
        if "pg_stat_statements" not in (cursor.fetchone()[0] or ""):
            return False
        cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return True


def statements_reset() -> None:
    """Forget the statements seen so far (when pg_stat_statements is loaded: --profile)."""
    from django.db import connection

    if _has_statements():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_statements_reset()")


def statement_costs(tasks: int, top: int = 12) -> list[str]:
    """The statements that took the most server time since the reset: calls and ms per
    task, one markdown row each (none unless pg_stat_statements is loaded)."""
    from django.db import connection

    if not _has_statements():
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT calls, total_exec_time + total_plan_time, rows, query "
            "FROM pg_stat_statements ORDER BY 2 DESC LIMIT %s",
            [top],
        )
        rows = cursor.fetchall()
    return [
        f"| {calls / tasks:.2f} | {ms / tasks:.3f} | {n / max(calls, 1):.1f} "
        f"| `{' '.join(query.split())[:160].replace('|', '/')}` |"
        for calls, ms, n, query in rows
    ]


def send_noops(count: int) -> None:
    from scheduler_site.celery import app

    noop = app.tasks[NOOP_TASK]
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            noop.apply_async(producer=producer)


def wait_succeeded(worker: WorkerProcess, start: int, count: int, timeout: float) -> list[float]:
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


def measure_celery_floor(count: int, warmup: int = THROUGHPUT_WARMUP) -> FloorResult:
    """`celery.accumulate` (returns its arguments; touches no database) sent `count` times as
    fast as one producer can, through a worker like the throughput leg's."""
    result = FloorResult(tasks=count)
    with running_worker("floor", pool="prefork", concurrency=THROUGHPUT_CONCURRENCY) as w:
        mark = len(w.lines)
        send_noops(warmup)
        wait_succeeded(w, mark, warmup, 60)
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
