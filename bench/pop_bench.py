"""Pop throughput of the task queue on PostgreSQL: service layer, raw psycopg and HTTP.

    scripts/with-postgres.sh --required -- .venv/bin/python -m bench.pop_bench [--quick]

(`make bench` runs it with the defaults.) It writes to the database in DATABASE_URL, which must
be a throwaway PostgreSQL database: it seeds a million rows and deletes what it popped.

Every cell forks N processes that pop from one scheduler in a loop for a fixed time (or until
the queue runs dry) and reports tasks popped / wall time. The finished tasks live in the same
scheduler that is popped, the hard case for the queue's index. Between cells the popped rows
and their events are deleted, the queue refilled with SQL and the table vacuumed, so every cell
starts from the same state. Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import cProfile
import http.client
import io
import json
import math
import multiprocessing
import os
import pstats
import queue
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SCHEDULER = "bench"
RUNNER = "bench-runner"
WORKER_APP = "pop-bench-worker"  # application_name of the popping connections
SMALL_FINISHED = 10_000
PROCESSES = (1, 4, 8)
HTTP_CLIENTS = (4, 8)
LIMITS = (1, 100)
# Rough tasks/s per (path, limit), only to size the queue so that no cell runs dry.
EXPECTED_RATE = {
    ("ours", 1): 6_000,
    ("ours", 100): 30_000,
    ("raw", 1): 9_000,
    ("raw", 100): 70_000,
    ("http", 1): 3_000,
    ("http", 100): 20_000,
}
TARGETS = {"single_8": 2_500, "batched": 25_000, "raw_single_8": 5_400, "raw_batched": 54_000}
FLAT_TOLERANCE = 0.8  # 1M-finished rate at least this fraction of the 10k-finished rate

RAW_POP_SQL = (
    "UPDATE tasks_task SET status = 'DISPATCHED', "
    "lease_expires_at = now() + interval '5 minutes', modified_at = now() "
    "WHERE id IN (SELECT id FROM tasks_task WHERE scheduler_id = %s AND status = 'QUEUED' "
    "AND not_before <= now() ORDER BY priority, created_at, id LIMIT %s "
    "FOR UPDATE SKIP LOCKED) RETURNING id"
)
PLAN_SQL = (
    "EXPLAIN (COSTS OFF) SELECT id FROM tasks_task WHERE scheduler_id = %s "
    "AND status = 'QUEUED' AND not_before <= now() ORDER BY priority, created_at, id "
    "LIMIT 1 FOR UPDATE SKIP LOCKED"
)
# Seeding: SQL expressions per column over generate_series (g); columns not named here get
# NULL or their model default, so a field added to Task does not break the seed.
FINISHED_SOURCE = (
    "(SELECT g, now() - interval '3 days' + g * interval '100 milliseconds' AS ts "
    "FROM generate_series(%(first)s, %(last)s) AS g) AS s"
)
FINISHED_COLUMNS = {
    "id": "gen_random_uuid()",
    "scheduler_id": "%(scheduler)s",
    "status": "'COMPLETED'",
    "priority": "g %% 4",
    "data": "jsonb_build_object('n', g)",
    "result": "'{\"ok\": true}'::jsonb",
    "attempts": "1",
    "not_before": "ts",
    "worker": "'bench-seed'",
    "created_at": "ts",
    "modified_at": "ts + interval '1 second'",
}
QUEUED_SOURCE = "generate_series(1, %(count)s) AS g"
QUEUED_COLUMNS = {
    "id": "gen_random_uuid()",
    "scheduler_id": "%(scheduler)s",
    "status": "'QUEUED'",
    "priority": "g %% 4",
    "data": "jsonb_build_object('n', g)",
    "attempts": "0",
    "not_before": "now() - interval '1 minute'",
    "created_at": "now() - interval '1 hour' + g * interval '1 microsecond'",
    "modified_at": "now() - interval '1 hour'",
}
CLEANUP_SQL = (
    "DELETE FROM tasks_taskevent e USING tasks_task t "
    "WHERE e.task_id = t.id AND t.scheduler_id = %(scheduler)s AND t.status <> 'COMPLETED'",
    "DELETE FROM tasks_task WHERE scheduler_id = %(scheduler)s AND status <> 'COMPLETED'",
)


# --- settings --------------------------------------------------------------------------------


def configure_environment() -> None:
    """Environment defaults for the settings module, before django.setup()."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scheduler_site.settings")
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost")
    os.environ.setdefault("SECURE_SSL_REDIRECT", "0")  # plain HTTP to gunicorn
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    if os.environ["DEBUG"].strip().lower() in {"0", "false", "no", "off", ""}:
        os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(48))
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://", "pgsql://")):
        sys.exit(
            "pop_bench: DATABASE_URL must point at a throwaway PostgreSQL database "
            f"(got {url or 'nothing'!r}). Run it as `make bench`, or\n"
            "  scripts/with-postgres.sh --required -- .venv/bin/python -m bench.pop_bench"
        )


def setup_django() -> None:
    import django
    from django.core.management import call_command
    from django.db import connection

    django.setup()
    if connection.vendor != "postgresql":
        sys.exit(f"pop_bench: needs PostgreSQL, DATABASE_URL gives {connection.vendor}.")
    call_command("migrate", verbosity=0, interactive=False)


# --- database state --------------------------------------------------------------------------


def execute(sql: str, params: dict[str, Any] | None = None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def vacuum() -> None:
    execute("VACUUM ANALYZE tasks_task")
    execute("VACUUM ANALYZE tasks_taskevent")


def prepare_scheduler() -> None:
    from tasks.models import Scheduler

    Scheduler.objects.update_or_create(
        id=SCHEDULER, defaults={"paused": False, "max_queue_size": 0, "lease_seconds": 300}
    )
    params = {"scheduler": SCHEDULER}
    execute(
        "DELETE FROM tasks_taskevent e USING tasks_task t "
        "WHERE e.task_id = t.id AND t.scheduler_id = %(scheduler)s",
        params,
    )
    execute("DELETE FROM tasks_task WHERE scheduler_id = %(scheduler)s", params)


def seed_sql(columns: dict[str, str], source: str) -> tuple[str, dict[str, Any]]:
    """INSERT … SELECT for tasks_task: `columns` gives expressions, the rest their defaults."""
    from django.db import connection

    from tasks.models import Task

    names, values, params = [], [], {}
    for task_field in Task._meta.concrete_fields:
        names.append(connection.ops.quote_name(task_field.column))
        default = None if task_field.null else task_field.get_default()
        if task_field.column in columns:
            values.append(columns[task_field.column])
        elif default is None:
            if not task_field.null:
                sys.exit(f"pop_bench: no seed value for tasks_task.{task_field.column}")
            values.append("NULL")
        else:
            key = f"default_{task_field.column}"
            values.append(f"%({key})s")
            params[key] = task_field.get_db_prep_save(default, connection)
    table = connection.ops.quote_name(Task._meta.db_table)
    sql = f"INSERT INTO {table} ({', '.join(names)}) SELECT {', '.join(values)} FROM {source}"
    return sql, params


def grow_finished(have: int, want: int, chunk: int = 250_000) -> None:
    """Add COMPLETED tasks to the benched scheduler until it holds `want` of them."""
    started = time.monotonic()
    sql, params = seed_sql(FINISHED_COLUMNS, FINISHED_SOURCE)
    for first in range(have + 1, want + 1, chunk):
        last = min(want, first + chunk - 1)
        execute(sql, {**params, "scheduler": SCHEDULER, "first": first, "last": last})
    vacuum()
    log(f"finished tasks: {have:,} -> {want:,} in {time.monotonic() - started:.1f} s")


def reset_queue(count: int) -> None:
    """Drop the popped rows (and their events) of the last cell, refill the queue, vacuum."""
    for cleanup in CLEANUP_SQL:
        execute(cleanup, {"scheduler": SCHEDULER})
    sql, params = seed_sql(QUEUED_COLUMNS, QUEUED_SOURCE)
    execute(sql, {**params, "scheduler": SCHEDULER, "count": count})
    vacuum()


def pop_plan() -> str:
    """The index(es) PostgreSQL uses for the pop's inner SELECT."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(PLAN_SQL, [SCHEDULER])
        plan = "\n".join(row[0] for row in cursor.fetchall())
    indexes = re.findall(r"(?:Index Scan|Index Only Scan|Bitmap Index Scan) using (\w+)", plan)
    return ", ".join(indexes) or plan.splitlines()[0].strip()


def server_version() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return str(cursor.fetchone()[0])


def create_runner_token() -> str:
    from django.contrib.auth.models import Group, User

    from tasks import accounts
    from tasks.roles import RUNNERS

    user, _created = User.objects.get_or_create(username=RUNNER)
    user.groups.add(Group.objects.get(name=RUNNERS))
    return accounts.token_create(user=user)[1]


# --- one cell: N processes popping -----------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    path: str  # "ours" (service layer), "raw" (psycopg) or "http"
    processes: int
    limit: int
    seconds: float
    port: int = 0
    token: str = ""
    gunicorn_pid: int = 0


@dataclass
class CellResult:
    cell: Cell
    popped: int = 0
    calls: int = 0
    wall: float = 0.0
    drained: bool = False
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    client_cpu: float = 0.0  # CPU seconds of the popping processes
    backend_cpu: float = 0.0  # of their PostgreSQL backends
    other_pg_cpu: float = 0.0  # of the rest of the cluster (background, gunicorn's backends)
    gunicorn_cpu: float = 0.0
    machine_busy_cpu: float = math.nan  # CPU seconds the whole machine was busy, anyone's work
    machine_cpu: float = math.nan  # CPU seconds the machine had (wall x CPUs)

    @property
    def rate(self) -> float:
        return self.popped / self.wall if self.wall > 0 else 0.0

    @property
    def calls_rate(self) -> float:
        return self.calls / self.wall if self.wall > 0 else 0.0

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    def per_call_ms(self, cpu_seconds: float) -> float:
        return cpu_seconds / self.calls * 1000 if self.calls else math.nan

    @property
    def accounted_cpu(self) -> float:
        return self.client_cpu + self.backend_cpu + self.other_pg_cpu + self.gunicorn_cpu

    @property
    def other_work(self) -> float:
        """Share of the machine's CPU busy with anything but this cell."""
        if not self.machine_cpu > 0:
            return math.nan
        return max(0.0, self.machine_busy_cpu - self.accounted_cpu) / self.machine_cpu


# --- CPU accounting from /proc ---------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process; 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    total = sum(values)
    return total - values[3] - values[4], total  # minus idle and iowait


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@dataclass
class CpuWatch:
    """CPU of the processes that serve the cell but are not its children: the cluster's other
    processes (background workers, gunicorn's backends) and gunicorn's workers."""

    pg_pids: list[int]
    gunicorn_pids: list[int]
    start: dict[int, float] = field(default_factory=dict)
    machine: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def begin(cls, cell: Cell) -> CpuWatch:
        import psycopg

        with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name IS DISTINCT FROM %s "
                "AND pid <> pg_backend_pid()",
                (WORKER_APP,),
            ).fetchall()
        gunicorn_pids = child_pids(cell.gunicorn_pid) if cell.gunicorn_pid else []
        watch = cls(pg_pids=[row[0] for row in rows], gunicorn_pids=gunicorn_pids)
        watch.start = {pid: process_cpu(pid) for pid in [*watch.pg_pids, *gunicorn_pids]}
        watch.machine = machine_cpu()
        return watch

    def finish(self, outcome: CellResult) -> None:
        def spent(pids: list[int]) -> float:
            return sum(max(0.0, process_cpu(pid) - self.start[pid]) for pid in pids)

        outcome.other_pg_cpu = spent(self.pg_pids)
        outcome.gunicorn_cpu = spent(self.gunicorn_pids)
        busy, total = machine_cpu()
        if total > self.machine[1]:
            outcome.machine_busy_cpu = (busy - self.machine[0]) / TICK
            outcome.machine_cpu = (total - self.machine[1]) / TICK


# --- one cell: N processes popping -----------------------------------------------------------


@dataclass
class Popper:
    pop: Callable[[], int]  # one pop; returns how many tasks it got
    close: Callable[[], None]
    backend_pid: int = 0


def service_popper(cell: Cell, index: int) -> Popper:
    from django.db import connection

    from tasks import services

    with connection.cursor() as cursor:
        cursor.execute(f"SET application_name = '{WORKER_APP}'")
        cursor.execute("SELECT pg_backend_pid()")
        backend_pid = int(cursor.fetchone()[0])
    worker = f"bench-{index}"

    def pop() -> int:
        return len(services.task_pop(scheduler_id=SCHEDULER, limit=cell.limit, worker=worker))

    return Popper(pop, connection.close, backend_pid)


def raw_popper(cell: Cell, index: int) -> Popper:
    import psycopg

    # autocommit off: one transaction a pop, as in the service
    conn = psycopg.connect(os.environ["DATABASE_URL"], application_name=WORKER_APP)

    def pop() -> int:
        rows = conn.execute(RAW_POP_SQL, (SCHEDULER, cell.limit)).fetchall()
        conn.commit()
        return len(rows)

    return Popper(pop, conn.close, conn.info.backend_pid)


def http_popper(cell: Cell, index: int) -> Popper:
    conn = http.client.HTTPConnection("127.0.0.1", cell.port, timeout=30)
    path = f"/api/schedulers/{SCHEDULER}/pop/"
    body = json.dumps({"limit": cell.limit}).encode()
    headers = {
        "Authorization": f"Token {cell.token}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Connection": "keep-alive",
    }

    def pop() -> int:
        for attempt in (1, 2):
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()  # the server closed the kept-alive connection: reconnect once
                if attempt == 2:
                    raise
        if response.status != 200:
            first_line = payload[:300].decode(errors="replace").splitlines()[:1]
            raise RuntimeError(f"HTTP {response.status}: {' '.join(first_line)}")
        return len(json.loads(payload)["results"])

    return Popper(pop, conn.close)


POPPERS: dict[str, Callable[[Cell, int], Popper]] = {
    "ours": service_popper,
    "raw": raw_popper,
    "http": http_popper,
}


def pop_loop(pop: Callable[[], int], seconds: float) -> dict[str, Any]:
    popped = calls = 0
    drained = False
    latencies: list[float] = []
    cpu_start = time.process_time()
    start = time.monotonic()
    deadline = start + seconds
    while True:
        began = time.perf_counter()
        got = pop()
        elapsed = time.perf_counter() - began
        calls += 1
        if not got:
            drained = True
            break
        latencies.append(elapsed)
        popped += got
        if time.monotonic() >= deadline:
            break
    return {
        "popped": popped,
        "calls": calls,
        "start": start,
        "end": time.monotonic(),
        "drained": drained,
        "latencies": latencies,
        "client_cpu": time.process_time() - cpu_start,
    }


def child(cell: Cell, index: int, barrier: Any, results: Any) -> None:
    """Body of one forked process: connect, wait for the others, pop until the deadline."""
    try:
        popper = POPPERS[cell.path](cell, index)
    except Exception as exc:
        barrier.abort()
        results.put({"error": f"setup: {exc!r}"[:300]})
        return
    try:
        barrier.wait(timeout=120)
        backend_start = process_cpu(popper.backend_pid) if popper.backend_pid else 0.0
        report = pop_loop(popper.pop, cell.seconds)
        if popper.backend_pid:
            report["backend_cpu"] = process_cpu(popper.backend_pid) - backend_start
        results.put(report)
    except Exception as exc:
        results.put({"error": repr(exc)[:300]})
    finally:
        popper.close()


def run_cell(cell: Cell) -> CellResult:
    from django.db import connections

    connections.close_all()  # no connection may be shared with the forked children
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(cell.processes + 1)
    results = context.Queue()
    processes = [
        context.Process(target=child, args=(cell, index, barrier, results), daemon=True)
        for index in range(cell.processes)
    ]
    for process in processes:
        process.start()
    outcome = CellResult(cell=cell)
    watch = None
    try:
        barrier.wait(timeout=120)
        watch = CpuWatch.begin(cell)
    except Exception as exc:  # BrokenBarrierError: a child failed to connect
        outcome.errors.append(f"start: {exc!r}")
    reports = collect(results, len(processes), timeout=cell.seconds + 180)
    if watch:
        watch.finish(outcome)
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
    return merge(outcome, reports)


def collect(results: Any, count: int, timeout: float) -> list[dict[str, Any]]:
    """One report per child; a child that died without one counts as an error."""
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    for _ in range(count):
        try:
            reports.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
        except queue.Empty:
            reports.append({"error": "a process sent no report (died or hung)"})
    return reports


def merge(outcome: CellResult, reports: list[dict[str, Any]]) -> CellResult:
    good = [report for report in reports if "error" not in report]
    outcome.errors.extend(report["error"] for report in reports if "error" in report)
    if good:
        outcome.popped = sum(report["popped"] for report in good)
        outcome.calls = sum(report["calls"] for report in good)
        outcome.wall = max(r["end"] for r in good) - min(r["start"] for r in good)
        outcome.drained = any(report["drained"] for report in good)
        outcome.latencies = [value for report in good for value in report["latencies"]]
        outcome.client_cpu = sum(report["client_cpu"] for report in good)
        outcome.backend_cpu = sum(report.get("backend_cpu", 0.0) for report in good)
    return outcome


def queue_size(cell: Cell) -> int:
    """Enough QUEUED rows that the cell should not run dry at the expected rate."""
    return max(2_000, math.ceil(EXPECTED_RATE[(cell.path, cell.limit)] * cell.seconds * 1.5))


def measure(cell: Cell) -> CellResult:
    reset_queue(queue_size(cell))
    result = run_cell(cell)
    note = " (ran dry)" if result.drained else ""
    if result.errors:
        note += f" ERRORS: {sorted(set(result.errors))[:3]}"
    log(
        f"{cell.path:>4} processes={cell.processes} limit={cell.limit:>3}: "
        f"{result.rate:>9,.0f} tasks/s, {result.calls_rate:>7,.0f} calls/s{note}"
    )
    return result


# --- HTTP ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(process: subprocess.Popen[bytes], port: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/healthz"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}; see gunicorn.log")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)  # it answers; /healthz may say 503 over the broker
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"gunicorn did not answer {url} within {timeout:.0f} s")


@contextmanager
def gunicorn(workers: int = 4) -> Iterator[tuple[int, int]]:
    """A gunicorn on a free loopback port with the bench's environment, as (port, pid);
    stopped on exit."""
    executable = Path(sys.executable).with_name("gunicorn")
    port = free_port()
    command = [str(executable), "scheduler_site.wsgi", "-w", str(workers)]
    command += ["-b", f"127.0.0.1:{port}"]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / "gunicorn.log", "wb") as logfile:
        process = subprocess.Popen(
            command, cwd=ROOT, env=dict(os.environ), stdout=logfile, stderr=subprocess.STDOUT
        )
        try:
            status = wait_until_up(process, port)
            for _ in range(workers * 4):  # let every worker load the URLconf and connect
                wait_until_up(process, port)
            log(f"gunicorn -w {workers} on 127.0.0.1:{port}, /healthz answered {status}")
            yield port, process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


# --- report ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def fraction(ours: CellResult | None, raw: CellResult | None) -> str:
    if ours is None or raw is None or not raw.rate:
        return "-"
    return f"{ours.rate / raw.rate:.2f}"


PATH_LABEL = {"ours": "service", "raw": "raw psycopg", "http": "HTTP (gunicorn -w 4)"}


def result_row(result: CellResult, versus: str) -> str:
    cell = result.cell
    errors = sorted({error.replace("|", "/")[:160] for error in result.errors})
    notes = ("ran dry; " if result.drained else "") + "; ".join(errors[:2])
    return (
        f"| {PATH_LABEL[cell.path]} | {cell.processes} | {cell.limit} | {fmt(result.rate)} "
        f"| {fmt(result.calls_rate)} | {versus} | {fmt(result.percentile_ms(0.5), 2)} "
        f"| {fmt(result.percentile_ms(0.99), 2)} | {notes} |"
    )


def throughput_table(results: dict[tuple[str, int, int], CellResult]) -> list[str]:
    lines = [
        "| path | processes | limit | tasks/s | calls/s | ours / raw | p50 ms | p99 ms | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in ordered_results(results):
        cell = result.cell
        raw = results.get(("raw", cell.processes, cell.limit))
        lines.append(result_row(result, "1.00" if cell.path == "raw" else fraction(result, raw)))
    return lines


def ordered_results(results: dict[tuple[str, int, int], CellResult]) -> list[CellResult]:
    keys = [(path, p, limit) for p in PROCESSES for limit in LIMITS for path in ("ours", "raw")]
    keys += [("http", clients, limit) for clients in HTTP_CLIENTS for limit in LIMITS]
    return [results[key] for key in keys if key in results]


def cpu_row(result: CellResult) -> str:
    cell = result.cell
    pg = result.backend_cpu + result.other_pg_cpu
    # The queue's side: the popping processes themselves, except over HTTP where they are
    # only clients and gunicorn does the work.
    queue_side = pg + (result.gunicorn_cpu if cell.path == "http" else result.client_cpu)
    ceiling = (os.cpu_count() or 1) * result.popped / queue_side if queue_side else math.nan
    gunicorn_ms = fmt(result.per_call_ms(result.gunicorn_cpu), 2) if cell.path == "http" else "-"
    return (
        f"| {PATH_LABEL[cell.path]} | {cell.processes} | {cell.limit} "
        f"| {fmt(result.per_call_ms(result.client_cpu), 2)} | {fmt(result.per_call_ms(pg), 2)} "
        f"| {gunicorn_ms} | {fmt(result.other_work * 100)} | {fmt(result.rate)} "
        f"| {fmt(ceiling)} |"
    )


def cpu_table(results: dict[tuple[str, int, int], CellResult]) -> list[str]:
    return [
        "| path | processes | limit | client CPU ms/call | PostgreSQL CPU ms/call "
        "| gunicorn CPU ms/call | other work % | tasks/s | CPU-bound ceiling tasks/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(cpu_row(result) for result in ordered_results(results)),
    ]


def verdict(measured: float, target: float) -> str:
    return "yes" if measured >= target else "NO"


@dataclass
class FlatPoint:
    ours: CellResult
    raw: CellResult
    plan: str


@dataclass
class Run:
    args: argparse.Namespace
    started: float = field(default_factory=time.monotonic)
    load_start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    results: dict[tuple[str, int, int], CellResult] = field(default_factory=dict)
    flat: dict[int, FlatPoint] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pg_version: str = ""


def targets_table(run: Run) -> list[str]:
    """The requirement's figures; its targets are 46 % of its raw reference, which the
    service / raw rows compare on whatever machine this runs."""
    rows: list[tuple[str, float, float, int]] = []  # label, target, measured, decimals
    for limit, key, unit in ((1, "single_8", "pops/s"), (100, "batched", "tasks/s")):
        ours, raw = run.results.get(("ours", 8, limit)), run.results.get(("raw", 8, limit))
        target, reference = TARGETS[key], TARGETS[f"raw_{key}"]
        if ours:
            rows.append((f"service, 8 processes, limit {limit} ({unit})", target, ours.rate, 0))
        if raw:
            label = f"raw psycopg, 8 processes, limit {limit} (the reference)"
            rows.append((label, reference, raw.rate, 0))
        if ours and raw and raw.rate:
            label = f"service / raw, 8 processes, limit {limit}"
            rows.append((label, target / reference, ours.rate / raw.rate, 2))
    lines = ["| figure | target | measured | met |", "|---|---:|---:|---|"]
    for label, target, value, digits in rows:
        lines.append(
            f"| {label} | ≥ {target:,.{digits}f} | {value:,.{digits}f} | {verdict(value, target)} |"
        )
    sizes = sorted(run.flat)
    if len(sizes) > 1:
        small, large = run.flat[sizes[0]], run.flat[sizes[-1]]
        ratio = large.ours.rate / max(small.ours.rate, 1e-9)
        lines.append(
            f"| flat: service rate at {sizes[-1]:,} / at {sizes[0]:,} finished "
            f"| ≥ {FLAT_TOLERANCE:.2f} | {ratio:.2f} | {verdict(ratio, FLAT_TOLERANCE)} |"
        )
    return lines


def reference_notes(run: Run) -> list[str]:
    notes = []
    for limit, key in ((1, "raw_single_8"), (100, "raw_batched")):
        raw = run.results.get(("raw", 8, limit))
        if raw and raw.rate < 0.8 * TARGETS[key]:
            notes.append(
                f"The raw loop itself made {raw.rate:,.0f} tasks/s at 8 processes, limit "
                f"{limit}, against the requirement's ~{TARGETS[key]:,} (other work took "
                f"{fmt(raw.other_work * 100)} % of the machine meanwhile): the absolute targets "
                "assume a faster or quieter machine; the service / raw fractions carry over."
            )
    return notes


def flat_table(run: Run) -> list[str]:
    lines = [
        "| finished tasks in the scheduler | service tasks/s | p50 ms | p99 ms "
        "| CPU ms/pop | raw tasks/s | ours / raw | other work % | index used by the pop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for finished in sorted(run.flat):
        point = run.flat[finished]
        lines.append(
            f"| {finished:,} | {fmt(point.ours.rate)} | {fmt(point.ours.percentile_ms(0.5), 2)} "
            f"| {fmt(point.ours.percentile_ms(0.99), 2)} "
            f"| {fmt(point.ours.per_call_ms(point.ours.client_cpu + point.ours.backend_cpu), 2)} "
            f"| {fmt(point.raw.rate)} "
            f"| {fraction(point.ours, point.raw)} | {fmt(point.ours.other_work * 100)} "
            f"| {point.plan} |"
        )
    sizes = sorted(run.flat)
    if len(sizes) > 1:
        first, last = run.flat[sizes[0]], run.flat[sizes[-1]]
        lines += [
            "",
            f"8 processes, limit 1. Service rate at {sizes[-1]:,} / at {sizes[0]:,} finished: "
            f"{last.ours.rate / max(first.ours.rate, 1e-9):.2f}; the raw loop's, as a gauge of "
            f"how much busier the machine got meanwhile: "
            f"{last.raw.rate / max(first.raw.rate, 1e-9):.2f}. CPU ms/pop = CPU of the popping "
            "process and its backend per pop, which other work on the machine disturbs less "
            "than the rate.",
        ]
    return lines


def report(run: Run) -> str:
    import django

    args = run.args
    load_end = os.getloadavg()
    single = run.results.get(("ours", 1, 1))
    lines = [
        "# Pop benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; PostgreSQL {run.pg_version}, Django "
        f"{django.get_version()}, {os.cpu_count()} CPUs, DEBUG={os.environ.get('DEBUG')}; "
        f"{args.finished:,} finished tasks in the popped scheduler; {args.seconds:g} s a cell; "
        f"total {time.monotonic() - run.started:.0f} s. Load average "
        f"{run.load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end: other work on "
        "the machine depresses every figure.",
        "",
        "## Throughput",
        "",
        *throughput_table(run.results),
        "",
        "calls/s = pop calls (or HTTP requests) a second; tasks/s = tasks popped a second. "
        "ours / raw compares with the raw psycopg loop at the same processes and limit "
        "(HTTP: client processes).",
    ]
    if single:
        lines += [
            "",
            f"Single pop latency (service, 1 process, limit 1): p50 "
            f"{fmt(single.percentile_ms(0.5), 2)} ms, p99 {fmt(single.percentile_ms(0.99), 2)} ms.",
        ]
    lines += [
        "",
        "## Where the CPU goes",
        "",
        *cpu_table(run.results),
        "",
        "CPU per pop call from /proc: client = the popping processes (the service layer runs "
        "there; over HTTP they are only clients), PostgreSQL = their backends plus the rest of "
        "the cluster (background writers, gunicorn's backends), gunicorn = its workers. "
        "other work % = share of the machine's CPU busy but not in this cell's processes during "
        "it: other sessions' work, and some kernel time (loopback networking) of the cell's own. "
        "CPU-bound ceiling = tasks/s if all CPUs did nothing but the queue's side of this cell "
        "(client + PostgreSQL; gunicorn + PostgreSQL over HTTP).",
    ]
    lines += ["", "## Flatness", "", *flat_table(run), "", "## Targets", "", *targets_table(run)]
    notes = [*run.notes, *reference_notes(run)]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


# --- the run ---------------------------------------------------------------------------------


def measure_flat_point(run: Run, finished: int, seconds: float) -> None:
    """Service and raw, 8 processes, limit 1, at the current number of finished tasks."""
    ours = measure(Cell("ours", 8, 1, seconds))
    plan = pop_plan()
    raw = measure(Cell("raw", 8, 1, seconds))
    run.flat[finished] = FlatPoint(ours, raw, plan)


def measure_matrix(run: Run, seconds: float) -> None:
    """Every cell at the full number of finished tasks; 8 x 1 comes from the flatness check."""
    large = run.flat[run.args.finished]
    run.results[("ours", 8, 1)], run.results[("raw", 8, 1)] = large.ours, large.raw
    for processes in PROCESSES:
        for limit in LIMITS:
            if (processes, limit) == (8, 1):
                continue
            for path in ("ours", "raw"):
                cell = Cell(path, processes, limit, seconds)
                run.results[(path, processes, limit)] = measure(cell)


def measure_http(run: Run, seconds: float) -> None:
    token = create_runner_token()
    with gunicorn() as (port, pid):
        for clients in HTTP_CLIENTS:
            for limit in LIMITS:
                cell = Cell(
                    "http", clients, limit, seconds, port=port, token=token, gunicorn_pid=pid
                )
                run.results[("http", clients, limit)] = measure(cell)


def profile_one_process(run: Run) -> None:
    """cProfile one service-layer popper in this process; print where the time goes."""
    from tasks import services

    limit = run.args.profile_limit
    reset_queue(queue_size(Cell("ours", 1, limit, run.args.seconds)))
    profiler = cProfile.Profile()
    profiler.enable()
    summary = pop_loop(
        lambda: len(services.task_pop(scheduler_id=SCHEDULER, limit=limit, worker="prof")),
        run.args.seconds,
    )
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    rate = summary["popped"] / (summary["end"] - summary["start"])
    text = f"profiled: limit {limit}, {summary['calls']:,} calls, {rate:,.0f} tasks/s\n"
    text += out.getvalue()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "pop_profile.txt").write_text(text)
    print(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, default=1_000_000, help="finished tasks")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20,000 finished, 2 s")
    parser.add_argument("--no-http", action="store_true", help="skip the gunicorn cells")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile one service process instead"
    )
    parser.add_argument("--profile-limit", type=int, default=1, choices=LIMITS)
    args = parser.parse_args(argv)
    if args.quick:
        args.finished, args.seconds = 20_000, 2.0
    if args.finished < 1 or args.seconds <= 0:
        parser.error("--finished and --seconds must be positive")
    return args


def run_benchmark(run: Run) -> None:
    args = run.args
    small = min(SMALL_FINISHED, args.finished)
    grow_finished(0, small)
    measure_flat_point(run, small, args.seconds)
    if args.finished > small:
        grow_finished(small, args.finished)
        measure_flat_point(run, args.finished, args.seconds)
    else:
        run.notes.append("--finished is not above 10,000: the flatness check has one point.")
    measure_matrix(run, args.seconds)
    if not args.no_http:
        measure_http(run, args.seconds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_environment()
    setup_django()
    run = Run(args=args, pg_version=server_version())
    log(f"PostgreSQL {run.pg_version}; load average {run.load_start[0]:.2f}")
    prepare_scheduler()
    if args.profile:
        grow_finished(0, args.finished)
        profile_one_process(run)
        return 0
    run_benchmark(run)
    text = report(run)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "pop_bench.md").write_text(text)
    print("\n" + text)
    log(f"written to {RESULTS_DIR / 'pop_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
