"""The worker bench's peer leg: the same no-op throughput through procrastinate's own worker
(`procrastinate worker`, 2 processes of concurrency 1 beside our prefork pool of 2), on the
same PostgreSQL. Left out, with the reason, when procrastinate is not installed."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import ROOT, log, machine_cpu, postmaster_pid, tree_cpu
from bench.pop_peers import missing, procrastinate_insert, procrastinate_reset
from bench.worker_setup import POLL_DEPTH_SECONDS, THROUGHPUT_CONCURRENCY, FloorResult

APP = "bench.procrastinate_app.app"
SUCCEEDED_SQL = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"


def _count(sql: str) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql)
        return int(cursor.fetchone()[0])


def _wait_count(sql: str, want: int, timeout: float) -> float | None:
    """Poll until `sql` counts `want`; the time it did (None on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _count(sql) >= want:
            return time.time()
        time.sleep(POLL_DEPTH_SECONDS)
    return None


def _start_workers() -> list[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "procrastinate", f"--app={APP}", "worker"]
    command += ["--queues", "bench", "--concurrency", "1"]
    return [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(THROUGHPUT_CONCURRENCY)
    ]


def measure_procrastinate_worker(count: int, warmup: int) -> FloorResult | str:
    """No-op jobs through procrastinate's worker: `count` inserted at once (its defer trigger
    notifies the listening workers), from the insert to the last one `succeeded`."""
    why = missing("procrastinate")
    if why:
        return why
    procrastinate_reset(workers=True)  # its schema, and nothing left over
    workers = _start_workers()
    result = FloorResult(tasks=count)
    try:
        if _wait_count("SELECT count(*) FROM procrastinate_workers", len(workers), 60) is None:
            return "procrastinate's workers did not register within 60 s"
        procrastinate_insert(warmup)
        _wait_count(SUCCEEDED_SQL, warmup, 60)
        procrastinate_reset(workers=False)
        roots = [*(w.pid for w in workers), postmaster_pid() or 0]
        cpu_start, machine_start = [tree_cpu(pid) for pid in roots], machine_cpu()
        started = time.time()
        procrastinate_insert(count)
        finished = _wait_count(SUCCEEDED_SQL, count, max(60.0, count / 20))
        cpu = [tree_cpu(pid) - at for pid, at in zip(roots, cpu_start, strict=True)]
        busy, total = machine_cpu()
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)
    result.completed = _count(SUCCEEDED_SQL)
    result.wall = (finished or time.time()) - started
    result.cpu = {"worker": sum(cpu[:-1]), "postgres": cpu[-1]}
    result.cpu.update(machine_busy=busy - machine_start[0], machine_total=total - machine_start[1])
    log(f"procrastinate worker: {result.completed:,} jobs in {result.wall:.2f} s")
    return result
