"""Orchestrator tick on PostgreSQL, and django-celery-beat's DatabaseScheduler beside it.

    scripts/with-postgres.sh --required -- .venv/bin/python -m bench.tick_bench [--quick]

(`make bench-tick` runs it with the defaults.) It writes to the database in DATABASE_URL, which
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
import math
import multiprocessing
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
RESULT_FILE = RESULTS_DIR / "tick_bench.md"
SCHEDULER = "bench"
IDLE_SIZES = (10_000, 100_000)  # plus --schedules
DUE_FRACTION = 0.01
WARMUP_TICKS = 3
IDLE_TICKS = 30
BEAT_LATER_TICKS = 3
CONCURRENT = 4
SEED_CHUNK = 250_000
BEAT_BATCH = 5_000
CHILD_TIMEOUT = 900.0

TARGET_IDLE_MS = 50.0
# Flat: the idle median at the largest size is at most 1.5 times that at 10,000, or at most
# 2 ms above it (ticks take about a millisecond: a ratio alone would judge the noise).
TARGET_FLAT = 1.5
TARGET_FLAT_MS = 2.0
TARGET_MATERIALISE_S = 5.0  # for 10,000 due; pro rata for other counts
TARGET_RSS_MB = 200.0

SEED_SQL = """
INSERT INTO schedules_schedule (id, scheduler_id, hash, data, priority, cron, interval_seconds,
    timezone, status, deadline_at, run_count, created_at, modified_at)
SELECT gen_random_uuid(), %(scheduler)s, NULL, '{}'::jsonb, 0, '', 3600, 'UTC', 'ACTIVE',
       now() + interval '1 hour' + (g %% 3600) * interval '1 second', 0,
       now() - interval '30 days' + g * interval '1 millisecond', now()
FROM generate_series(%(first)s, %(last)s) AS g
"""
# Random rows among those that never ran, so due rows are spread over the table's pages;
# due over the last ten minutes, so they do not all tie on deadline_at.
MARK_DUE_SQL = """
UPDATE schedules_schedule
SET deadline_at = now() - interval '1 minute' - random() * interval '10 minutes'
WHERE id IN (SELECT id FROM schedules_schedule WHERE scheduler_id = %(scheduler)s
             AND run_count = 0 ORDER BY random() LIMIT %(count)s)
"""
CLEAR_TASKS_SQL = (
    "DELETE FROM tasks_taskevent e USING tasks_task t "
    "WHERE e.task_id = t.id AND t.scheduler_id = %(scheduler)s",
    "DELETE FROM tasks_task WHERE scheduler_id = %(scheduler)s",
)
CHECK_SQL = """
SELECT (SELECT count(*) FROM tasks_task WHERE scheduler_id = %(scheduler)s),
       (SELECT count(DISTINCT schedule_id) FROM tasks_task WHERE scheduler_id = %(scheduler)s),
       (SELECT count(*) FROM tasks_task WHERE scheduler_id = %(scheduler)s
           AND status = 'QUEUED'),
       (SELECT count(*) FROM schedules_schedule WHERE scheduler_id = %(scheduler)s
           AND status = 'ACTIVE' AND deadline_at <= now())
"""


# --- settings --------------------------------------------------------------------------------


def configure_environment() -> None:
    """Environment for the settings module, before django.setup()."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("CELERY_BROKER_URL", "filesystem://")  # needs no server
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://", "pgsql://")):
        sys.exit(
            "tick_bench: DATABASE_URL must point at a throwaway PostgreSQL database "
            f"(got {url or 'nothing'!r}). Run it as `make bench-tick`, or\n"
            "  scripts/with-postgres.sh --required -- .venv/bin/python -m bench.tick_bench"
        )


def setup_django(*, migrate: bool) -> None:
    import django
    from django.db import connection

    django.setup()
    if connection.vendor != "postgresql":
        sys.exit(f"tick_bench: needs PostgreSQL, DATABASE_URL gives {connection.vendor}.")
    if migrate:
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)


# --- database state --------------------------------------------------------------------------


def execute(sql: str, params: dict[str, Any] | None = None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def fetchone(sql: str, params: dict[str, Any] | None = None) -> tuple[Any, ...]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return tuple(cursor.fetchone())


def vacuum(*tables: str) -> None:
    """VACUUM cannot run in a transaction: Django runs in autocommit outside atomic()."""
    for table in tables:
        execute(f"VACUUM ANALYZE {table}")


def prepare_scheduler() -> None:
    """A fresh `bench` scheduler with the model's defaults, and nothing in it."""
    from tasks import services
    from tasks.models import Scheduler

    for sql in CLEAR_TASKS_SQL:
        execute(sql, {"scheduler": SCHEDULER})
    execute("DELETE FROM schedules_schedule WHERE scheduler_id = %(s)s", {"s": SCHEDULER})
    Scheduler.objects.filter(id=SCHEDULER).delete()
    services.scheduler_create(id=SCHEDULER)


def grow_schedules(have: int, want: int) -> None:
    """Add hourly schedules, none due, until the scheduler holds `want`; then vacuum."""
    started = time.monotonic()
    for first in range(have + 1, want + 1, SEED_CHUNK):
        last = min(want, first + SEED_CHUNK - 1)
        execute(SEED_SQL, {"scheduler": SCHEDULER, "first": first, "last": last})
    vacuum("schedules_schedule")
    log(f"schedules: {have:,} -> {want:,} in {time.monotonic() - started:.1f} s")


def make_due(count: int) -> None:
    """Clear the tasks of the last run (so no active task blocks a schedule) and make `count`
    schedules that never ran due, 1 to 11 minutes ago."""
    for sql in CLEAR_TASKS_SQL:
        execute(sql, {"scheduler": SCHEDULER})
    execute(MARK_DUE_SQL, {"scheduler": SCHEDULER, "count": count})
    vacuum("schedules_schedule", "tasks_task", "tasks_taskevent")


@dataclass(frozen=True)
class Check:
    tasks: int
    distinct_schedules: int
    queued: int
    still_due: int

    def ok(self, due: int) -> bool:
        return self.tasks == self.distinct_schedules == self.queued == due and not self.still_due

    def describe(self, due: int) -> str:
        verdict = "ok" if self.ok(due) else "WRONG"
        return (
            f"{verdict}: {self.tasks:,} tasks for {self.distinct_schedules:,} schedules, "
            f"{self.still_due:,} still due"
        )


def check_materialised() -> Check:
    return Check(*fetchone(CHECK_SQL, {"scheduler": SCHEDULER}))


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


def server_version() -> str:
    return str(fetchone("SHOW server_version")[0])


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
    vacuum("django_celery_beat_periodictask")
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


SQL_KINDS = (
    ("due_schedules: SELECT ... FOR UPDATE SKIP LOCKED", r'^SELECT "schedules_schedule"\."id"'),
    ("advance: UPDATE schedules_schedule", r'^UPDATE "schedules_schedule"'),
    ("INSERT tasks_task", r'^INSERT INTO "tasks_task"'),
    ("INSERT tasks_taskevent", r'^INSERT INTO "tasks_taskevent"'),
    ("the rest (scheduler, due check, savepoints)", r""),
)


def sql_breakdown(captured: list[dict[str, str]]) -> dict[str, Any]:
    """Statements and their time by kind, and each due_schedules statement's ms in order."""
    totals = {kind: [0, 0.0] for kind, _ in SQL_KINDS}
    due_ms: list[float] = []
    for query in captured:
        kind = next(k for k, pattern in SQL_KINDS if re.match(pattern, query["sql"], re.S))
        totals[kind][0] += 1
        totals[kind][1] += float(query["time"])
        if kind == SQL_KINDS[0][0]:
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


# --- results ---------------------------------------------------------------------------------


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class IdlePoint:
    schedules: int
    report: dict[str, Any]
    plan: str

    @property
    def median_ms(self) -> float:
        return statistics.median(self.report["samples"]) * 1000

    @property
    def p95_ms(self) -> float:
        return percentile(self.report["samples"], 0.95) * 1000


@dataclass
class MaterialiseRun:
    label: str
    due: int
    processes: int
    wall: float
    returned: int
    check: Check
    rss_peak_kib: int


@dataclass
class BeatPoint:
    rows: int
    report: dict[str, Any]

    @property
    def later_s(self) -> float:
        return statistics.median(self.report["later"])


@dataclass
class Run:
    args: argparse.Namespace
    started: float = field(default_factory=time.monotonic)
    load_start: str = ""
    pg_version: str = ""
    idle: dict[int, IdlePoint] = field(default_factory=dict)
    materialised: list[MaterialiseRun] = field(default_factory=list)
    beat: dict[int, BeatPoint] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


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
    for sql in CLEAR_TASKS_SQL:
        execute(sql, {"scheduler": SCHEDULER})
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
            sql = captured.captured_queries[-1]["sql"]
            with connection.cursor() as cursor:
                cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
                plan = "\n".join(row[0] for row in cursor.fetchall())
            parts.append(f"-- {policy.name}, limit {share}, {due:,} due\n{sql}\n\n{plan}\n")
        transaction.set_rollback(True)
    return "\n".join(parts)


def profile_text(due: int, report: dict[str, Any], plans: str) -> str:
    sql = report["sql"]
    lines = [
        f"materialised {report['made']:,} of {due:,} due in {report['seconds']:.2f} s "
        f"(under cProfile); {uptime()}",
        "",
        "statements by kind: count, seconds",
    ]
    for kind, (count, seconds) in sql["totals"].items():
        lines.append(f"  {kind}: {count}, {seconds:.2f}")
    due_ms = ", ".join(f"{ms:.0f}" for ms in sql["due_ms"])
    lines += [
        "",
        "due_schedules statements in order (each batch: one per policy with a share), "
        f"ms: {due_ms}",
        "",
        plans,
        report["profile"],
    ]
    return "\n".join(lines)


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


# --- report ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def mib(kib: int) -> float:
    return kib / 1024


def uptime() -> str:
    try:
        done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    except OSError:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return done.stdout.strip()


def idle_table(run: Run) -> list[str]:
    lines = [
        "| schedules | median ms | p95 ms | max ms | first tick in a fresh process ms "
        "| queries/tick | client CPU ms/tick | due check: index, buffers | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for size in sorted(run.idle):
        point = run.idle[size]
        report = point.report
        lines.append(
            f"| {size:,} | {point.median_ms:.2f} | {point.p95_ms:.2f} "
            f"| {max(report['samples']) * 1000:.2f} | {report['cold'] * 1000:.1f} "
            f"| {report['queries']} | {report['cpu'] * 1000:.2f} | {point.plan} "
            f"| {mib(report['rss_peak_kib']):.0f} |"
        )
    return lines


def materialise_table(run: Run) -> list[str]:
    lines = [
        "| run | schedules | due | wall s | schedules/s | tasks returned | check "
        "| peak RSS MB (per process) |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for m in run.materialised:
        rate = m.due / m.wall if m.wall else math.nan
        lines.append(
            f"| {m.label} | {run.args.schedules:,} | {m.due:,} | {m.wall:.2f} | {rate:,.0f} "
            f"| {m.returned:,} | {m.check.describe(m.due)} | {mib(m.rss_peak_kib):.0f} |"
        )
    return lines


def ours_at(run: Run, size: int) -> IdlePoint | None:
    return run.idle.get(size)


def beat_table(run: Run) -> list[str]:
    lines = [
        "| PeriodicTask rows | load s | first tick s | later tick s (median of 3) "
        "| tick after a change s | RSS after load MB | peak RSS MB "
        "| our idle tick ms, same size | beat later tick / ours |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows in sorted(run.beat):
        point = run.beat[rows]
        report = point.report
        ours = ours_at(run, rows)
        ours_ms = f"{ours.median_ms:.2f}" if ours else "-"
        ratio = f"{point.later_s * 1000 / ours.median_ms:,.0f}x" if ours else "-"
        lines.append(
            f"| {rows:,} | {report['load']:.2f} | {report['first']:.3f} | {point.later_s:.3f} "
            f"| {report['changed']:.2f} | {mib(report['rss_loaded_kib']):.0f} "
            f"| {mib(report['rss_peak_kib']):.0f} "
            f"| {ours_ms} | {ratio} |"
        )
    return lines


def beat_summary(run: Run) -> list[str]:
    if not run.beat or not run.idle:
        return []
    rows, size = max(run.beat), max(run.idle)
    beat, ours = run.beat[rows], run.idle[size]
    sent = [r for r, p in run.beat.items() if p.report["sent"]]
    lines = [
        f"Our idle tick at {size:,} schedules ({ours.median_ms:.2f} ms) against beat's later "
        f"tick at {rows:,} rows ({beat.later_s * 1000:,.0f} ms): beat is "
        f"{beat.later_s * 1000 / ours.median_ms:,.0f} times slower with {size / rows:g} times "
        f"fewer entries; its load takes {beat.report['load']:.1f} s, ours has none "
        f"(first tick in a fresh process: {ours.report['cold'] * 1000:.0f} ms).",
    ]
    if sent:
        lines.append(f"WARNING: beat sent something at {sent} rows; nothing should be due.")
    return lines


def target_row(figure: str, target: str, measured: str, met: bool) -> str:
    return f"| {figure} | {target} | {measured} | {'yes' if met else 'NO'} |"


def targets_table(run: Run) -> list[str]:
    lines = ["| figure | target | measured | met |", "|---|---:|---:|---|"]
    idle_target = f"≤ {TARGET_IDLE_MS:g} ms"
    for size in sorted(run.idle):
        median = run.idle[size].median_ms
        figure = f"idle tick at {size:,} schedules, median"
        lines.append(target_row(figure, idle_target, f"{median:.2f} ms", median <= TARGET_IDLE_MS))
    sizes = sorted(run.idle)
    if len(sizes) > 1:
        large, small = run.idle[sizes[-1]].median_ms, run.idle[sizes[0]].median_ms
        ratio, extra = large / small, large - small
        figure = f"flat: idle median at {sizes[-1]:,} against at {sizes[0]:,}"
        target = f"≤ {TARGET_FLAT:g}x or ≤ +{TARGET_FLAT_MS:g} ms"
        met = ratio <= TARGET_FLAT or extra <= TARGET_FLAT_MS
        lines.append(target_row(figure, target, f"{ratio:.2f}x, {extra:+.2f} ms", met))
    for m in run.materialised:
        target = TARGET_MATERIALISE_S * m.due / 10_000
        met = m.wall <= target and m.check.ok(m.due)
        figure = f"{m.due:,} due materialised, {m.label}"
        lines.append(target_row(figure, f"≤ {target:g} s", f"{m.wall:.2f} s", met))
    peaks = [p.report["rss_peak_kib"] for p in run.idle.values()]
    peak = mib(max(peaks + [m.rss_peak_kib for m in run.materialised]))
    rss_target = f"≤ {TARGET_RSS_MB:g} MB"
    figure = "peak RSS of a tick process"
    lines.append(target_row(figure, rss_target, f"{peak:.0f} MB", peak <= TARGET_RSS_MB))
    return lines


def report(run: Run) -> str:
    import django

    args = run.args
    lines = [
        "# Orchestrator tick benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; PostgreSQL {run.pg_version}, Django "
        f"{django.get_version()}, {os.cpu_count()} CPUs, DEBUG={os.environ.get('DEBUG')}; "
        f"{args.schedules:,} hourly interval schedules in one scheduler (default policy "
        f"weights, batch 500); total {time.monotonic() - run.started:.0f} s.",
        "",
        f"Load at the start: `{run.load_start}`; at the end: `{uptime()}`. Other work on the "
        "machine depresses every figure.",
        "",
        "## Idle tick (nothing due)",
        "",
        *idle_table(run),
        "",
        f"{IDLE_TICKS} ticks after {WARMUP_TICKS} warm-up ticks, each in a freshly spawned "
        "process. Buffers = pages the due check (`queries.schedulers_with_due`) touched, "
        "from EXPLAIN (ANALYZE, BUFFERS): the size-independent part of the cost.",
        "",
        "## Materialising due schedules",
        "",
        *materialise_table(run),
        "",
        "One `services.orchestrate()` call per process (it loops in batches of 500 until "
        "nothing is due). Check: one QUEUED task per due schedule, no schedule left due.",
        "",
        "## django-celery-beat DatabaseScheduler (nothing due)",
        "",
        *beat_table(run),
        "",
        *beat_summary(run),
        "",
        "load = `DatabaseScheduler(app=app, lazy=False)`, which reads every enabled row into "
        "memory; first tick builds its heap; later ticks compare the whole schedule with its "
        "last copy; a tick after a change (`PeriodicTasks.update_changed()`, what any edit of "
        "a row does, and forced every 5 minutes) reloads every row and rebuilds the heap. "
        "Each size in a fresh process.",
        "",
        "## Targets",
        "",
        *targets_table(run),
    ]
    if run.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in run.notes)]
    return "\n".join(lines) + "\n"


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
    args = parser.parse_args(argv)
    args.beat = (10_000, 100_000)
    if args.quick:
        args.schedules, args.beat = 100_000, (2_000, 10_000)
    if args.schedules < 100:
        parser.error("--schedules must be at least 100")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_environment()
    setup_django(migrate=True)
    run = Run(args=args, load_start=uptime(), pg_version=server_version())
    log(f"PostgreSQL {run.pg_version}; {run.load_start}")
    prepare_scheduler()
    if args.profile:
        run_profile(run)
        return 0
    run_benchmark(run)
    text = report(run)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(text)
    print("\n" + text)
    log(f"written to {RESULT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
