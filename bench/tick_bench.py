"""Orchestrator tick on PostgreSQL, and django-celery-beat's DatabaseScheduler beside it.

    scripts/with-postgres.sh --required -- .venv/bin/python -m bench.tick_bench [--quick]

(`make bench-tick` runs it with the defaults, on production settings: DEBUG off.) It
writes to the database in DATABASE_URL, which
must be a throwaway PostgreSQL database: it seeds a million schedules into one scheduler.

The schedules are seeded with SQL: hourly interval schedules whose next run lies one to two
hours ahead, so nothing falls due while the benchmark runs. Every measurement runs in a freshly
spawned process (Django set up, then the work), so its peak RSS is the tick's and not the
seeding's. Measured:

- idle tick (nothing due): `services.orchestrate()` at 10,000, 100,000 and the full number of
  schedules, median and p95 of 30 ticks after a warm-up, with the due check's plan;
- materialising: 1 % of the schedules made due, one full `orchestrate()` (it loops in batches
  until nothing is due), then the same with 4 processes at once on another 1 %; every run is
  checked: one task per due schedule, none left due;
- django-celery-beat: `DatabaseScheduler` construction (its load) and `tick()` with hourly
  `PeriodicTask` rows, nothing due.

Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bench import common
from bench.common import (
    RESULTS_DIR,
    execute,
    fetchone,
    log,
    server_version,
    sql,
    table,
    uptime,
    vacuum,
    write_result,
)
from bench.tick_report import (
    CONCURRENT,
    IDLE_TICKS,
    WARMUP_TICKS,
    BeatPoint,
    Check,
    IdlePoint,
    MaterialiseRun,
    Run,
    profile_text,
    report,
)

SCHEDULER = "bench"
IDLE_SIZES = (10_000, 100_000)  # plus --schedules
DUE_FRACTION = 0.01
BEAT_LATER_TICKS = 3
SEED_CHUNK = 250_000
BEAT_BATCH = 5_000
CHILD_TIMEOUT = 900.0


# Table names come from the models (Model._meta.db_table): `{schedule}`, `{task}`, `{event}`.
SEED_SQL = """
INSERT INTO {schedule} (id, scheduler_id, hash, data, priority, cron, interval_seconds,
    timezone, status, deadline_at, run_count, created_at, modified_at,
    failure_backoff_max_seconds, consecutive_failures, paused_reason)
SELECT gen_random_uuid(), %(scheduler)s, NULL, '{{}}'::jsonb, 0, '', 3600, 'UTC', 'ACTIVE',
       now() + interval '1 hour' + (g %% 3600) * interval '1 second', 0,
       now() - interval '30 days' + g * interval '1 millisecond', now(), 86400, 0, ''
FROM generate_series(%(first)s, %(last)s) AS g
"""
# Random rows among those that never ran, so due rows are spread over the table's pages;
# due over the last ten minutes, so they do not all tie on deadline_at.
MARK_DUE_SQL = """
UPDATE {schedule}
SET deadline_at = now() - interval '1 minute' - random() * interval '10 minutes'
WHERE id IN (SELECT id FROM {schedule} WHERE scheduler_id = %(scheduler)s
             AND run_count = 0 ORDER BY random() LIMIT %(count)s)
"""
CLEAR_TASKS_SQL = (
    "DELETE FROM {event} e USING {task} t "
    "WHERE e.task_id = t.id AND t.scheduler_id = %(scheduler)s",
    "DELETE FROM {task} WHERE scheduler_id = %(scheduler)s",
)
CHECK_SQL = """
SELECT (SELECT count(*) FROM {task} WHERE scheduler_id = %(scheduler)s),
       (SELECT count(DISTINCT schedule_id) FROM {task} WHERE scheduler_id = %(scheduler)s),
       (SELECT count(*) FROM {task} WHERE scheduler_id = %(scheduler)s
           AND status = 'QUEUED'),
       (SELECT count(*) FROM {schedule} WHERE scheduler_id = %(scheduler)s
           AND status = 'ACTIVE' AND deadline_at <= now())
"""


# --- settings and tables ---------------------------------------------------------------------


def configure_environment() -> None:
    """Production settings (bench/common.py) and a broker that needs no server."""
    os.environ.setdefault("CELERY_BROKER_URL", "filesystem://")
    common.configure_environment("tick_bench")


def setup_django(*, migrate: bool) -> None:
    common.setup_django("tick_bench", migrate=migrate)


# --- database state --------------------------------------------------------------------------


def prepare_scheduler() -> None:
    """A fresh `bench` scheduler with the model's defaults, and nothing in it."""
    from tasks import services
    from tasks.models import Scheduler

    for statement in CLEAR_TASKS_SQL:
        execute(sql(statement), {"scheduler": SCHEDULER})
    execute(sql("DELETE FROM {schedule} WHERE scheduler_id = %(s)s"), {"s": SCHEDULER})
    Scheduler.objects.filter(id=SCHEDULER).delete()
    services.scheduler_create(id=SCHEDULER)


def grow_schedules(have: int, want: int) -> None:
    """Add hourly schedules, none due, until the scheduler holds `want`; then vacuum."""
    from schedules.models import Schedule

    started = time.monotonic()
    for first in range(have + 1, want + 1, SEED_CHUNK):
        last = min(want, first + SEED_CHUNK - 1)
        execute(sql(SEED_SQL), {"scheduler": SCHEDULER, "first": first, "last": last})
    vacuum(Schedule)
    log(f"schedules: {have:,} -> {want:,} in {time.monotonic() - started:.1f} s")


def make_due(count: int) -> None:
    """Clear the tasks of the last run (so no active task blocks a schedule) and make `count`
    schedules that never ran due, 1 to 11 minutes ago."""
    from schedules.models import Schedule
    from tasks.models import Task, TaskEvent

    for statement in CLEAR_TASKS_SQL:
        execute(sql(statement), {"scheduler": SCHEDULER})
    execute(sql(MARK_DUE_SQL), {"scheduler": SCHEDULER, "count": count})
    vacuum(Schedule, Task, TaskEvent)


def check_materialised() -> Check:
    return Check(*fetchone(sql(CHECK_SQL), {"scheduler": SCHEDULER}))


def due_check_plan() -> str:
    """Index and buffers of the tick's due check (`queries.schedulers_with_due`) at the
    current size."""
    from django.utils import timezone

    from schedules import queries

    queryset = queries.schedulers_with_due(now=timezone.now()).values_list("id")
    plan = queryset.explain(analyze=True, buffers=True, costs=False, timing=False)
    indexes = re.findall(r"(?:Index Scan|Index Only Scan|Bitmap Index Scan) using (\w+)", plan)
    buffers = re.search(r"Buffers: shared hit=(\d+)(?: read=(\d+))?", plan)
    pages = sum(int(n) for n in buffers.groups() if n) if buffers else 0
    return f"{', '.join(indexes) or plan.splitlines()[0].strip()}, {pages} buffers"


# --- django-celery-beat rows -----------------------------------------------------------------


def grow_periodic_tasks(have: int, want: int) -> None:
    """Hourly PeriodicTask rows that ran in the last ten minutes: none due. bulk_create skips
    the change signal, hence update_changed()."""
    from django.utils import timezone
    from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

    started = time.monotonic()
    every, _created = IntervalSchedule.objects.get_or_create(
        every=3600, period=IntervalSchedule.SECONDS
    )
    now = timezone.now()
    for first in range(have, want, BEAT_BATCH):
        rows = [
            PeriodicTask(
                name=f"bench-{n:07d}",
                task="bench.noop",
                interval=every,
                last_run_at=now - timedelta(seconds=n % 600),
            )
            for n in range(first, min(want, first + BEAT_BATCH))
        ]
        PeriodicTask.objects.bulk_create(rows)
    PeriodicTasks.update_changed()
    vacuum(PeriodicTask)
    log(f"periodic tasks: {have:,} -> {want:,} in {time.monotonic() - started:.1f} s")


# --- jobs run in a spawned child -------------------------------------------------------------


def peak_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    value = call()
    return time.perf_counter() - began, value


def idle_ticks_job(ticks: int) -> dict[str, Any]:
    """Ticks with nothing due: the first one (connects), a warm-up, then `ticks` timed."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from schedules import services

    made: dict[str, int] = {}
    cold, first = timed(services.orchestrate)
    made.update(first)
    for _ in range(WARMUP_TICKS - 1):
        made.update(services.orchestrate())
    with CaptureQueriesContext(connection) as captured:
        made.update(services.orchestrate())
    samples: list[float] = []
    cpu_began = time.process_time()
    for _ in range(ticks):
        seconds, created = timed(services.orchestrate)
        samples.append(seconds)
        made.update(created)
    cpu = (time.process_time() - cpu_began) / ticks
    return {"cold": cold, "samples": samples, "queries": len(captured), "cpu": cpu, "made": made}


def materialise_job() -> dict[str, Any]:
    from schedules import services

    seconds, made = timed(services.orchestrate)
    return {"seconds": seconds, "made": sum(made.values())}


def concurrent_job(barrier: Any) -> dict[str, Any]:
    """One of several tick runners started together: connect, wait for the others, tick."""
    from django.db import connection

    from schedules import services

    connection.ensure_connection()
    barrier.wait(timeout=120)
    start = time.monotonic()
    made = services.orchestrate()
    return {"start": start, "end": time.monotonic(), "made": sum(made.values())}


def beat_job(later_ticks: int) -> dict[str, Any]:
    """DatabaseScheduler's load (construction reads every enabled row), its first tick (builds
    the heap), later ticks (compare the schedule with the last copy, peek at the heap) and a
    tick after a change to any row (reloads every row and rebuilds the heap; also forced every
    5 minutes)."""
    from django_celery_beat.models import PeriodicTasks
    from django_celery_beat.schedulers import DatabaseScheduler

    from scheduler_site.celery import app

    load, scheduler = timed(lambda: DatabaseScheduler(app=app, lazy=False))
    entries = len(scheduler._schedule or {})
    rss_loaded = peak_rss_kib()
    first, sleep = timed(scheduler.tick)
    later = [timed(scheduler.tick)[0] for _ in range(later_ticks)]
    PeriodicTasks.update_changed()  # what an edit in the admin does
    changed = timed(scheduler.tick)[0]
    # Sending would open the broker connection (a cached property) and mark entries dirty.
    sent = "producer" in scheduler.__dict__ or bool(scheduler._dirty)
    return {
        "load": load,
        "entries": entries,
        "first": first,
        "later": later,
        "changed": changed,
        "sleep": float(sleep),
        "sent": sent,
        "rss_loaded_kib": rss_loaded,
    }


def sql_kinds() -> tuple[tuple[str, str], ...]:
    """The statements of a materialising tick, by kind: (name, pattern of their SQL)."""
    from schedules.models import Schedule
    from tasks.models import Task, TaskEvent

    def quoted(model: Any) -> str:
        return re.escape(table(model))

    return (
        ("due_schedules: SELECT ... FOR UPDATE SKIP LOCKED", rf"^SELECT {quoted(Schedule)}\."),
        (f"advance: UPDATE {Schedule._meta.db_table}", rf"^UPDATE {quoted(Schedule)}"),
        (f"INSERT {Task._meta.db_table}", rf"^INSERT INTO {quoted(Task)}"),
        (f"INSERT {TaskEvent._meta.db_table}", rf"^INSERT INTO {quoted(TaskEvent)}"),
        ("the rest (scheduler, due check, savepoints)", r""),
    )


def sql_breakdown(captured: list[dict[str, str]]) -> dict[str, Any]:
    """Statements and their time by kind, and each due_schedules statement's ms in order."""
    kinds = sql_kinds()
    totals = {kind: [0, 0.0] for kind, _ in kinds}
    due_ms: list[float] = []
    for query in captured:
        kind = next(k for k, pattern in kinds if re.match(pattern, query["sql"], re.S))
        totals[kind][0] += 1
        totals[kind][1] += float(query["time"])
        if kind == kinds[0][0]:
            due_ms.append(float(query["time"]) * 1000)
    return {"totals": totals, "due_ms": due_ms}


def profile_job() -> dict[str, Any]:
    """One materialising orchestrate() under cProfile, with every statement's time."""
    import cProfile
    import io
    import pstats

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from schedules import services

    profiler = cProfile.Profile()
    with CaptureQueriesContext(connection) as captured:
        began = time.perf_counter()
        profiler.enable()
        made = services.orchestrate()
        profiler.disable()
        seconds = time.perf_counter() - began
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)
    return {
        "seconds": seconds,
        "made": sum(made.values()),
        "profile": out.getvalue(),
        "sql": sql_breakdown(captured.captured_queries),
    }


CHILD_JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "idle": idle_ticks_job,
    "materialise": materialise_job,
    "concurrent": concurrent_job,
    "beat": beat_job,
    "profile": profile_job,
}


def child_main(job: str, args: tuple[Any, ...], results: Any) -> None:
    """Body of a spawned process: set Django up, run the job, report it with its peak RSS."""
    try:
        configure_environment()
        setup_django(migrate=False)
        setup_rss = peak_rss_kib()
        outcome = CHILD_JOBS[job](*args)
        outcome.update(rss_setup_kib=setup_rss, rss_peak_kib=peak_rss_kib())
    except BaseException:
        outcome = {"error": traceback.format_exc()}
    results.put(outcome)


def run_children(job: str, args_list: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Run `job` in one spawned process per argument tuple; their reports, in no order."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=child_main, args=(job, args, results), daemon=True)
        for args in args_list
    ]
    for process in processes:
        process.start()
    reports = [results.get(timeout=CHILD_TIMEOUT) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
    errors = [report["error"] for report in reports if "error" in report]
    if errors:
        raise RuntimeError(f"{job} child failed:\n{errors[0]}")
    return reports


def run_child(job: str, *args: Any) -> dict[str, Any]:
    return run_children(job, [args])[0]


def run_concurrent(processes: int) -> list[dict[str, Any]]:
    barrier = multiprocessing.get_context("spawn").Barrier(processes)
    return run_children("concurrent", [(barrier,)] * processes)


# --- the run ---------------------------------------------------------------------------------


def measure_idle(run: Run, schedules: int) -> None:
    report = run_child("idle", IDLE_TICKS)
    point = IdlePoint(schedules, report, due_check_plan())
    run.idle[schedules] = point
    if report["made"]:
        run.notes.append(f"Idle ticks at {schedules:,} schedules created tasks: {report['made']}.")
    log(
        f"idle tick at {schedules:,} schedules: median {point.median_ms:.2f} ms, "
        f"p95 {point.p95_ms:.2f} ms, {report['queries']} queries; {point.plan}"
    )


def measure_materialise(run: Run, due: int) -> None:
    make_due(due)
    report = run_child("materialise")
    outcome = MaterialiseRun(
        "one process",
        due,
        1,
        report["seconds"],
        report["made"],
        check_materialised(),
        report["rss_peak_kib"],
    )
    run.materialised.append(outcome)
    log(f"materialised {due:,} due in {outcome.wall:.2f} s: {outcome.check.describe(due)}")


def measure_concurrent(run: Run, due: int) -> None:
    make_due(due)
    reports = run_concurrent(CONCURRENT)
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    outcome = MaterialiseRun(
        f"{CONCURRENT} processes at once",
        due,
        CONCURRENT,
        wall,
        sum(r["made"] for r in reports),
        check_materialised(),
        max(r["rss_peak_kib"] for r in reports),
    )
    run.materialised.append(outcome)
    split = ", ".join(f"{r['made']:,}" for r in reports)
    run.notes.append(f"{CONCURRENT} concurrent tick runners made {split} tasks each.")
    log(
        f"{CONCURRENT} processes materialised {due:,} due in {wall:.2f} s ({split}): "
        f"{outcome.check.describe(due)}"
    )


def measure_beat(run: Run, sizes: tuple[int, ...]) -> None:
    have = 0
    for rows in sizes:
        grow_periodic_tasks(have, rows)
        have = rows
        point = BeatPoint(rows, run_child("beat", BEAT_LATER_TICKS))
        run.beat[rows] = point
        report = point.report
        log(
            f"beat at {rows:,} rows: load {report['load']:.2f} s, first tick "
            f"{report['first']:.3f} s, later ticks {point.later_s:.3f} s, after a change "
            f"{report['changed']:.2f} s, "
            f"{report['entries']:,} entries, sent anything: {report['sent']}"
        )


def run_benchmark(run: Run) -> None:
    args = run.args
    have = 0
    for size in sorted({*(s for s in IDLE_SIZES if s < args.schedules), args.schedules}):
        grow_schedules(have, size)
        have = size
        measure_idle(run, size)
    due = max(1, round(args.schedules * DUE_FRACTION))
    measure_materialise(run, due)
    measure_concurrent(run, due)
    for statement in CLEAR_TASKS_SQL:
        execute(sql(statement), {"scheduler": SCHEDULER})
    measure_beat(run, args.beat)


def explain_due_queries(due: int) -> str:
    """EXPLAIN ANALYZE of the first batch's due_schedules statements, one per policy, in a
    transaction rolled back (they lock rows)."""
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from schedules import queries
    from schedules.policies import allocate
    from tasks.models import Scheduler

    weights = Scheduler.objects.get(id=SCHEDULER).policy_weights
    parts: list[str] = []
    with transaction.atomic():
        for policy, share in allocate(500, weights):
            with CaptureQueriesContext(connection) as captured:
                queries.due_schedules(
                    scheduler_id=SCHEDULER, now=timezone.now(), policy=policy, limit=share
                )
            statement = captured.captured_queries[-1]["sql"]
            with connection.cursor() as cursor:
                cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {statement}")
                plan = "\n".join(row[0] for row in cursor.fetchall())
            parts.append(f"-- {policy.name}, limit {share}, {due:,} due\n{statement}\n\n{plan}\n")
        transaction.set_rollback(True)
    return "\n".join(parts)


def run_profile(run: Run) -> None:
    """Seed, make 1 % due, EXPLAIN the due queries, profile one orchestrate()."""
    grow_schedules(0, run.args.schedules)
    due = max(1, round(run.args.schedules * DUE_FRACTION))
    make_due(due)
    plans = explain_due_queries(due)
    text = profile_text(due, run_child("profile"), plans)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "tick_profile.txt").write_text(text)
    print(text)
    log(f"written to {RESULTS_DIR / 'tick_profile.txt'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=1_000_000, help="schedules in all")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 100,000 schedules, beat at 2k and 10k"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: EXPLAIN ANALYZE the due queries and cProfile one materialising tick",
    )
    parser.add_argument("--beat", help="PeriodicTask row counts, comma-separated")
    args = parser.parse_args(argv)
    beat = args.beat
    args.beat = (10_000, 100_000)
    if args.quick:
        args.schedules, args.beat = 100_000, (2_000, 10_000)
    if beat:
        args.beat = tuple(int(n) for n in beat.split(","))
    if args.schedules < 100:
        parser.error("--schedules must be at least 100")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_environment()
    setup_django(migrate=True)
    run = Run(args=args, load_start=uptime(), pg_version=server_version())
    log(f"{run.pg_version}; {run.load_start}")
    prepare_scheduler()
    if args.profile:
        run_profile(run)
        return 0
    run_benchmark(run)
    write_result("tick_bench", report(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
