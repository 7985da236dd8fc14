"""CPU of one dispatch round per task, measured in one process, the paths interleaved: figures
that do not depend on the machine's load, as the worker bench's throughput does (issue 12).

    scripts/with-postgres.sh --required -- scripts/with-redis.sh --required -- \\
        .venv/bin/python -m bench.perf_worker_round [--rounds 100] [--size 25]

- the round's database part: the ORM round (tasks.dispatch._dispatch_locked: BEGIN, the row
  lock, the count, the claim, the events, COMMIT; what SQLite and flow-controlled queues run)
  against the one-query round of PostgreSQL (tasks.queue.refill), client CPU of this process and
  CPU of its PostgreSQL backend (/proc);
- the round's messages: one Celery `send_task` a task (as tasks.dispatch sent them before)
  against tasks.dispatch_messages.round_sender, client CPU.

Writes to the database in DATABASE_URL (a throwaway one) and the Redis in TEST_REDIS_URL,
whose default queue it purges. Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench import common

SCHEDULER = "round-bench"


def old_send(tasks: Sequence[Any]) -> None:
    """One send_task a task, in one producer's batch: tasks.dispatch's sends before round_sender."""
    from scheduler_site.celery import app
    from tasks.dispatch_messages import RUN_TASK

    options = {"queue": "celery", "headers": {"scheduler": SCHEDULER}}
    with app.producer_or_acquire() as producer, producer.batch():
        for number, task in enumerate(tasks):
            args = [str(task.id), task.attempts]
            app.send_task(
                RUN_TASK,
                args=args,
                producer=producer,
                ignore_result=True,
                argsrepr=repr(args),
                kwargsrepr="{}",
                **({} if number == 0 else {"declare": []}),
                **options,
            )


def new_send(tasks: Sequence[Any]) -> None:
    from tasks.dispatch_messages import round_sender, send_all

    with round_sender(celery_queue="celery", scheduler_id=SCHEDULER) as send:
        send_all(tasks, send)


def measure(rounds: int, size: int) -> dict[str, list[float]]:
    """{path: [client CPU s, backend CPU s]} summed over `rounds` rounds of `size` tasks."""
    from django.db import connection

    from bench.worker_setup import clear_tasks, reset_scheduler, seed_queued
    from scheduler_site.celery import app
    from tasks import dispatch

    reset_scheduler(SCHEDULER, threshold=size)
    claimed: list[Sequence[Any]] = []
    dispatch._send = lambda tasks, *_, **__: claimed.append(tasks)  # sent below, measured apart
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    rounds_of: dict[str, Callable[[], int]] = {
        "orm": lambda: dispatch._dispatch_locked(SCHEDULER, skip_if_busy=True),
        "one query": lambda: dispatch._dispatch_in_one_round_trip(SCHEDULER, skip_if_busy=True),
    }
    sends = {"orm": old_send, "one query": new_send}
    cost = {name: [0.0, 0.0] for name in ("round, ORM", "round, one query")}
    cost |= {"messages, send_task": [0.0, 0.0], "messages, round_sender": [0.0, 0.0]}
    for number in range(rounds):
        for path in ("orm", "one query") if number % 2 else ("one query", "orm"):
            clear_tasks(SCHEDULER)
            seed_queued(SCHEDULER, size)
            claimed.clear()
            client, server = time.process_time(), common.process_cpu(backend)
            if rounds_of[path]() != size:
                raise RuntimeError(f"{path}: the round did not claim {size} tasks")
            part = cost["round, ORM" if path == "orm" else "round, one query"]
            part[0] += time.process_time() - client
            part[1] += common.process_cpu(backend) - server
            client = time.process_time()
            sends[path](claimed[0])
            name = "messages, send_task" if path == "orm" else "messages, round_sender"
            cost[name][0] += time.process_time() - client
        if number % 20 == 0:
            app.control.purge()
    app.control.purge()
    return cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds of each path")
    parser.add_argument("--size", type=int, default=25, help="tasks a round")
    args = parser.parse_args(argv)
    common.configure_environment("worker_bench", redis=True)
    common.setup_django("worker_bench")
    cost = measure(args.rounds, args.size)
    per_task = args.rounds * args.size / 1000  # seconds to ms a task
    print(f"{args.rounds} rounds of {args.size} tasks each way, interleaved; {common.uptime()}\n")
    print("| path | client CPU ms a task | PostgreSQL backend CPU ms a task |")
    print("|---|---:|---:|")
    for name, (client, server) in cost.items():
        print(f"| {name} | {client / per_task:.3f} | {server / per_task:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
