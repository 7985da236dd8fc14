"""Shared by bench/perf_flow_*.py: the pop cost of a flow-controlled queue against a plain one
(DESIGN §9.4, issue 15 part 8), one process, PostgreSQL.

    scripts/with-postgres.sh --required -- .venv/bin/python -m bench.perf_flow_fair [--quick]

It writes to the database in DATABASE_URL (a throwaway one: it seeds and deletes queues).
Each cell seeds a queue beside a plain one of the same size, pops `pops` single tasks from
each in alternating blocks, and prints the median microseconds per pop and the ratio to the
plain queue. Figures only, no assertion.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import sql


def setup(name: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"flow-control pop cost: {name}")
    parser.add_argument("--quick", action="store_true", help="small queues, fewer pops")
    parser.add_argument("--pops", type=int, default=300)
    args = parser.parse_args()
    # Production settings (DEBUG off: with it on, Django logs every query, a cost per
    # statement that the plain pop's one statement pays less of than a flow hand-out).
    common.configure_environment(name, run_as=common.standalone(name))
    os.environ.setdefault("CELERY_BROKER_URL", "filesystem://")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    if args.quick:
        args.pops = min(args.pops, 100)
    return args


def fresh_queue(scheduler_id: str, **settings: Any) -> None:
    from tasks import services
    from tasks.models import Scheduler

    Scheduler.objects.filter(id=scheduler_id).delete()
    services.scheduler_create(id=scheduler_id, **settings)


def seed(scheduler_id: str, count: int, data: Callable[[int], dict[str, Any]]) -> None:
    from django.db import connection
    from django.utils import timezone

    from tasks import queue
    from tasks.models import Scheduler, Task

    scheduler, now = Scheduler.objects.get(id=scheduler_id), timezone.now()
    for start in range(0, count, 5000):
        rows = [
            Task(scheduler=scheduler, data=data(n), priority=n % 7, created_at=now, modified_at=now)
            for n in range(start, min(start + 5000, count))
        ]
        queue.insert_queued(rows, actor="bench", note="seeded", at=now)
    with connection.cursor() as cursor:
        cursor.execute(sql("ANALYZE {task}"))


def pop_costs_us(scheduler_ids: list[str], pops: int, block: int = 10) -> list[float]:
    """Median microseconds of a pop of one task from each queue, measured in alternating
    blocks of `block` pops (so that the machine's load, which moves, weighs on each alike);
    the first block of each warms the caches and is not counted."""
    from tasks import services

    costs: dict[str, list[float]] = {scheduler_id: [] for scheduler_id in scheduler_ids}
    for _ in range(pops // block + 1):
        for scheduler_id in scheduler_ids:
            for _ in range(block):
                started = time.perf_counter()
                got = services.task_pop(scheduler_id=scheduler_id, limit=1, worker="bench")
                costs[scheduler_id].append((time.perf_counter() - started) * 1e6)
                if not got:
                    raise SystemExit(f"{scheduler_id}: queue ran dry; seed more")
    return [statistics.median(costs[scheduler_id][block:]) for scheduler_id in scheduler_ids]


def report(rows: list[tuple[str, int, float, float]]) -> None:
    print(f"{'cell':34} {'queued':>8} {'us/pop':>9} {'x plain':>8}")
    for cell, size, cost, plain in rows:
        print(f"{cell:34} {size:8} {cost:9.0f} {cost / plain:8.2f}")
    print("target: <= 1.30 x plain per feature, flat with queue size")
