"""CPU of one worker task's own path, in one process: `tasks.execution.execute` (the claim, the
refill on claim, the handler, the report) on DISPATCHED tasks, without Celery around it. The
worker bench's throughput swings with the machine's load; client CPU per task of this one
process (and of its PostgreSQL backend) does much less, so code before and after a change can
be compared in runs interleaved by hand (issue 12).

    scripts/with-postgres.sh --required -- scripts/with-redis.sh --required -- \\
        .venv/bin/python -m bench.perf_worker_claim [--tasks 2000] [--batches 4]

The refill on claim runs its dispatch round (the claim of QUEUED tasks, their events) but
its messages are not sent: sending is bench.perf_worker_round's. Writes to the database in
DATABASE_URL (a throwaway one). Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from typing import Any

from bench import common

SCHEDULER = "claim-bench"
THRESHOLD = 50


def measure(tasks: int, batches: int) -> tuple[float, float, int]:
    """(client CPU s, backend CPU s, tasks completed) over `batches` batches of `tasks`. A
    list stands for the broker: a dispatch round fills it, each task taken from its front is
    executed, and the claims' refill rounds append what they dispatch, as a worker's would."""
    from django.db import connection

    from bench.worker_setup import clear_tasks, reset_scheduler, seed_queued
    from tasks import dispatch, execution

    reset_scheduler(SCHEDULER, threshold=THRESHOLD)
    broker: deque[Any] = deque()
    dispatch._send = lambda sent, *_, **__: broker.extend(sent)  # messages: not measured here
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    client = server = 0.0
    done = 0
    for _ in range(batches):
        clear_tasks(SCHEDULER)
        seed_queued(SCHEDULER, tasks + THRESHOLD)
        broker.clear()
        start, start_server = time.process_time(), common.process_cpu(backend)
        dispatch._dispatch_in_one_round_trip(SCHEDULER, skip_if_busy=False)
        for _ in range(tasks):
            task = broker.popleft()
            done += execution.execute(task.id, task.attempts, worker="bench") == "completed"
        client += time.process_time() - start
        server += common.process_cpu(backend) - start_server
    return client, server, done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks a batch")
    parser.add_argument("--batches", type=int, default=4, help="batches of fresh tasks")
    args = parser.parse_args(argv)
    common.configure_environment("worker_bench", redis=True)
    common.setup_django("worker_bench")
    client, server, done = measure(args.tasks, args.batches)
    per_task = args.tasks * args.batches / 1000  # seconds to ms a task
    print(f"{args.batches} batches of {args.tasks} tasks, {done} completed; {common.uptime()}\n")
    print("| path | client CPU ms a task | PostgreSQL backend CPU ms a task |")
    print("|---|---:|---:|")
    print(f"| execute | {client / per_task:.3f} | {server / per_task:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
