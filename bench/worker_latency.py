"""The worker bench's latency legs: push → RUNNING at idle, on PostgreSQL + Redis and on the
embedded default (SQLite + the filesystem broker, in a child process)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import ROOT, log, percentile, server_version
from bench.worker_setup import (
    LATENCY_SCHEDULER,
    LATENCY_WARMUP,
    PAUSE_SECONDS,
    POLL_SECONDS,
    RESCUE_AFTER_SECONDS,
    SAMPLE_TIMEOUT_SECONDS,
    LatencyResult,
    Sample,
    clear_tasks,
    embedded_environment,
    first_line_time,
    pg_sessions,
    reset_scheduler,
    running_worker,
)
from tests.support.processes import WorkerProcess


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


def push_one(worker: WorkerProcess, n: int) -> Sample | None:
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
    result = LatencyResult(label, server_version(), "1 process (--pool solo)")
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
