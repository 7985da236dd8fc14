"""What every bench shares: production settings on a throwaway PostgreSQL, table names from
the models, statistics, CPU accounting and the machine's load.

CPU per call is measured on both sides, and each bench says which it shows:
- client: `resource.getrusage(RUSAGE_SELF)` (user + system) of each measuring process, read
  in that process around its loop (`time.process_time()` is the same counter);
- database: utime + stime of the PostgreSQL backend serving that process's connection, read
  from /proc/<backend pid>/stat before and after (the cluster is local: scripts/with-postgres.sh);
  backends the bench does not own (gunicorn's, the background writer) are read the same way
  over the measured window.
"""

from __future__ import annotations

import math
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
TICK = os.sysconf("SC_CLK_TCK")
POSTGRES_SCHEMES = ("postgres://", "postgresql://", "pgsql://")


# --- settings --------------------------------------------------------------------------------


def production_environment() -> dict[str, str]:
    """The variables production runs with (DEBUG off, a secret key, allowed hosts), for this
    process and every server or worker it starts. The key is made for this run, never stored."""
    return {
        "DJANGO_SETTINGS_MODULE": "scheduler_site.settings",
        "DEBUG": "0",
        "SECRET_KEY": os.environ.get("BENCH_SECRET_KEY") or secrets.token_urlsafe(48),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "SECURE_SSL_REDIRECT": "0",  # plain HTTP to gunicorn on loopback
        "LOG_LEVEL": "WARNING",
    }


def configure_environment(bench: str, *, redis: bool = False, run_as: str = "") -> None:
    """Production settings over DATABASE_URL (a throwaway PostgreSQL), before django.setup().
    `run_as`: how to start a bench that has no make target (said when the database is wrong)."""
    env = production_environment()
    os.environ.update(env)
    os.environ["BENCH_SECRET_KEY"] = env["SECRET_KEY"]  # forked children and servers share it
    problems = []
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(POSTGRES_SCHEMES):
        problems.append(f"DATABASE_URL must be a throwaway PostgreSQL (got {url or 'nothing'!r})")
    if redis:
        broker = os.environ.get("TEST_REDIS_URL", "")
        if not broker.startswith(("redis://", "rediss://")):
            problems.append(f"TEST_REDIS_URL must point at a Redis (got {broker or 'nothing'!r})")
        os.environ["CELERY_BROKER_URL"] = broker
    if problems:
        how = run_as or f"make {bench_target(bench)}"
        sys.exit(f"{bench}: " + "; ".join(problems) + f". Run it as `{how}`.")


def standalone(bench: str) -> str:
    """How a bench without a make target runs: on a throwaway PostgreSQL of its own."""
    return f"scripts/with-postgres.sh --required -- .venv/bin/python -m bench.{bench}"


def fresh_queue(scheduler_id: str) -> None:
    """Migrate, and (re)create the pull queue `scheduler_id` with no tasks and no events."""
    from django.core.management import call_command

    from tasks.models import Scheduler

    call_command("migrate", verbosity=0, interactive=False)
    Scheduler.objects.update_or_create(id=scheduler_id, defaults={"paused": False})
    execute(sql("DELETE FROM {event}"))
    execute(sql("DELETE FROM {task}"))


def bench_target(bench: str) -> str:
    return "bench-" + bench.removesuffix("_bench")


def setup_django(bench: str, *, vendor: str = "postgresql", migrate: bool = True) -> None:
    import django
    from django.core.management import call_command
    from django.db import connection

    django.setup()
    if connection.vendor != vendor:
        sys.exit(f"{bench}: needs {vendor}, DATABASE_URL gives {connection.vendor}.")
    if migrate:
        call_command("migrate", verbosity=0, interactive=False)


# --- database --------------------------------------------------------------------------------


def table(model: Any) -> str:
    """The quoted table name of a model: benches never spell one out."""
    from django.db import connection

    return connection.ops.quote_name(model._meta.db_table)


def sql(template: str) -> str:
    """A statement with the models' table names filled in ({schedule}, {task}, {event})."""
    from schedules.models import Schedule
    from tasks.models import Task, TaskEvent

    return template.format(schedule=table(Schedule), task=table(Task), event=table(TaskEvent))


def execute(sql: str, params: Any = None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def fetchone(sql: str, params: Any = None) -> tuple[Any, ...]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return tuple(cursor.fetchone() or ())


def vacuum(*models: Any) -> None:
    for model in models:
        execute(f"VACUUM ANALYZE {table(model)}")


def server_version() -> str:
    from django.db import connection

    if connection.vendor == "sqlite":
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"
    return f"PostgreSQL {fetchone('SHOW server_version')[0]}"


def database_settings() -> str:
    """The durability settings in force: the figures mean nothing without them."""
    names = ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers")
    return ", ".join(f"{name}={fetchone(f'SHOW {name}')[0]}" for name in names)


# --- statistics ------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def percentile(values: Iterable[float], fraction: float) -> float:
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return math.nan
    return clean[min(len(clean) - 1, int(fraction * len(clean)))]


def spread(values: Sequence[float]) -> str:
    """`min-max` of the rounds."""
    clean = [v for v in values if not math.isnan(v)]
    return f"{fmt(min(clean))}-{fmt(max(clean))}" if clean else "-"


def ratio(ours: float, theirs: float) -> str:
    if math.isnan(ours) or math.isnan(theirs) or not theirs:
        return "-"
    return f"{ours / theirs:.2f}x"


def fmt(value: float, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


# --- CPU and load ----------------------------------------------------------------------------


def own_cpu() -> float:
    """User + system CPU seconds of this process (getrusage)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int, *, reaped: bool = False) -> float:
    """CPU seconds of a process from /proc (with `reaped`, also of the children it reaped);
    0 when it is gone."""
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
        total += process_cpu(pid, reaped=True)
        pending.extend(child_pids(pid))
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    total = sum(values)
    return (total - values[3] - values[4]) / TICK, total / TICK  # minus idle and iowait


def postmaster_pid() -> int | None:
    """The local PostgreSQL's postmaster: the parent of this connection's backend."""
    return parent_pid(int(fetchone("SELECT pg_backend_pid()")[0]))


@dataclass
class LoadWatch:
    """os.getloadavg() at the start and end of every measured stretch, and the share of the
    machine's CPU that was busy over them (anyone's work, ours included)."""

    samples: list[float] = field(default_factory=list)
    busy: float = 0.0
    total: float = 0.0
    _mark: tuple[float, float] = (0.0, 0.0)

    def begin(self) -> None:
        self.samples.append(os.getloadavg()[0])
        self._mark = machine_cpu()

    def end(self) -> None:
        self.samples.append(os.getloadavg()[0])
        busy, total = machine_cpu()
        self.busy += busy - self._mark[0]
        self.total += total - self._mark[1]

    def text(self) -> str:
        if not self.samples:
            return "not measured"
        busy = f"{self.busy / self.total * 100:.0f} %" if self.total > 0 else "-"
        return (
            f"1-minute load average {min(self.samples):.2f}-{max(self.samples):.2f} "
            f"(median {median(self.samples):.2f}) on {os.cpu_count()} CPUs; machine CPU busy "
            f"{busy} over the measured stretches"
        )


def uptime() -> str:
    try:
        done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    except OSError:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return done.stdout.strip()


# --- output ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_result(name: str, text: str) -> Path:
    """The report to bench/results/<name>.md and to stdout."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    print("\n" + text, flush=True)
    log(f"written to {path}")
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Rows of a markdown table; the first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines
