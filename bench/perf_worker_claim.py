"""CPU of one worker task's own path, in one process: `tasks.execution.execute` (the claim, the
refill on claim, the handler, the report) on DISPATCHED tasks, without Celery around it. The
worker bench's throughput swings with the machine's load; client CPU per task of this one
process (and of its PostgreSQL backend) does much less, so code before and after a change can
be compared in runs interleaved by hand (issue 12).

    scripts/with-postgres.sh --required -- scripts/with-redis.sh --required -- \\
        .venv/bin/python -m bench.perf_worker_claim [--tasks 2000] [--batches 4]

The refill on claim runs its dispatch round (the claim of QUEUED tasks, their events) but
its messages are not sent: sending is bench.perf_worker_round's. `--message-batch N` also
runs the same tasks N at a time through `execution_batch.execute_batch` (a `tasks.run_tasks`
message's path), once with a report and the next claim in one statement and once in two
(WORKER_CLAIM_WITH_REPORT), the three paths interleaved batch by batch. Writes to the
database in DATABASE_URL (a throwaway one). Figures only: nothing here asserts a timing.
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


PATHS = ("execute", "batch, one statement", "batch, two statements")


def measure(tasks: int, batches: int, message_batch: int) -> dict[str, list[float]]:
    """{path: [client CPU s, backend CPU s, tasks completed]} over `batches` batches of
    `tasks` each. A list stands for the broker: a dispatch round fills it, tasks are taken
    from its front (one at a time, or `message_batch` at a time as one message's entries),
    and the claims' refill rounds append what they dispatch, as a worker's would."""
    from django.conf import settings
    from django.db import connection

    from bench.worker_setup import clear_tasks, reset_scheduler, seed_queued
    from tasks import dispatch

    reset_scheduler(SCHEDULER, threshold=THRESHOLD)
    broker: deque[Any] = deque()
    dispatch._send = lambda sent, *_, **__: broker.extend(sent)  # messages: not measured here
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    paths = PATHS if message_batch > 1 else PATHS[:1]
    cost = {path: [0.0, 0.0, 0.0] for path in paths}
    for number in range(batches):
        turn = number % len(paths)  # each path first in turn: the table grows as they run
        for path in paths[turn:] + paths[:turn]:
            clear_tasks(SCHEDULER)
            seed_queued(SCHEDULER, tasks + THRESHOLD)
            broker.clear()
            settings.WORKER_CLAIM_WITH_REPORT = path != "batch, two statements"
            start, start_server = time.process_time(), common.process_cpu(backend)
            dispatch._dispatch_in_one_round_trip(SCHEDULER, skip_if_busy=False)
            done = _drain(broker, tasks, 1 if path == "execute" else message_batch)
            cost[path][0] += time.process_time() - start
            cost[path][1] += common.process_cpu(backend) - start_server
            cost[path][2] += done
    return cost


def _drain(broker: deque[Any], tasks: int, message_batch: int) -> int:
    """Run `tasks` tasks off the broker's front, `message_batch` a message; how many completed."""
    from tasks import execution, execution_batch

    done = 0
    while done < tasks and broker:
        group = [broker.popleft() for _ in range(min(message_batch, len(broker), tasks - done))]
        if message_batch == 1:
            outcomes = [execution.execute(group[0].id, group[0].attempts, worker="bench")]
        else:
            entries = [execution_batch.Entry(task.id, task.attempts) for task in group]
            outcomes = execution_batch.execute_batch(
                entries, worker="bench", celery_queue="celery", scheduler_id=SCHEDULER
            )
        done += sum(outcome == "completed" for outcome in outcomes)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks a batch")
    parser.add_argument("--batches", type=int, default=4, help="batches of fresh tasks")
    parser.add_argument(
        "--message-batch", type=int, default=8, help="tasks a message of the batched paths"
    )
    args = parser.parse_args(argv)
    common.configure_environment("worker_bench", redis=True)
    common.setup_django("worker_bench")
    cost = measure(args.tasks, args.batches, args.message_batch)
    per_task = args.tasks * args.batches / 1000  # seconds to ms a task
    done = int(cost["execute"][2])
    print(f"{args.batches} batches of {args.tasks} tasks, {done} completed; {common.uptime()}\n")
    print("| path | client CPU ms a task | PostgreSQL backend CPU ms a task | completed |")
    print("|---|---:|---:|---:|")
    for path, (client, server, completed) in cost.items():
        print(f"| {path} | {client / per_task:.3f} | {server / per_task:.3f} | {completed:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
