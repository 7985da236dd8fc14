"""What task expiry costs a pop, on PostgreSQL: the pop statement with its expiry predicate
(`expires_at IS NULL OR expires_at > now`) against the same statement without it, as a ratio.

    scripts/with-postgres.sh --required -- .venv/bin/python -m bench.perf_flow_expiry [--quick]

It writes to the database in DATABASE_URL, which must be a throwaway PostgreSQL database.

Per cell (queue size x how the queue's tasks expire) the queue is seeded with SQL and
vacuumed, then pops of one task run in alternating blocks, one block with the predicate (the
statement tasks.queue runs), one without (the same text minus that line), so both see the same
queue as it drains. Each pop is the real statement: it commits its hand-out and its event.
Reported: median and p90 microseconds per pop, and the ratio with / without. Figures only:
nothing here asserts a timing. Target (issue 15): ratio <= 1.3, flat with queue size.

Cells: `none` (no task has an expiry: the common case), `future` (every task has one, none due)
and `expired-head` (the oldest 1,000 tasks expired but not reaped yet: a pop with the predicate
walks over them every time; the reaper ends them within its period, so this is the worst case
between two reaper runs, not the usual). There the statement without the predicate pops a twin
queue without the expired head (it would hand the expired tasks out, and so empty the head
that is measured). Its cost grows with that backlog, not with the queue's size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from bench import common
from bench.common import sql

PREDICATE = "AND (t.expires_at IS NULL OR t.expires_at > %(now)s)"
SCHEDULER = "bench-expiry"
PLAIN = "bench-expiry-plain"  # the expired-head cell's twin queue, without the expired head
SIZES = (10_000, 200_000)
QUICK_SIZES = (5_000, 50_000)
BLOCK = 100
EXPIRED_HEAD = 1_000  # due expiries the reaper has not ended yet (a backlog of its period)
EXPIRIES = {
    "none": "NULL",
    "future": "now() + interval '1 day'",
    # g counts from 1: the head of the queue (the oldest) is the first EXPIRED_HEAD tasks.
    "expired-head": f"CASE WHEN g <= {EXPIRED_HEAD} THEN now() - interval '1 minute' END",
}


def configure_environment() -> None:
    common.configure_environment("perf_flow_expiry", run_as=common.standalone("perf_flow_expiry"))


def setup_django() -> None:
    import django
    from django.core.management import call_command
    from django.db import connection

    django.setup()
    if connection.vendor != "postgresql":
        sys.exit(f"perf_flow_expiry: needs PostgreSQL, DATABASE_URL gives {connection.vendor}.")
    call_command("migrate", verbosity=0, interactive=False)


def execute(template: str, params: dict[str, Any] | None = None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql(template), params)


def seed(count: int, expiry: str, scheduler: str = SCHEDULER) -> None:
    """`count` QUEUED tasks (priorities 0..3, oldest first), each column given or defaulted."""
    from django.db import connection

    from tasks.models import Task

    given = {
        "id": "gen_random_uuid()",
        "scheduler_id": "%(scheduler)s",
        "status": "'QUEUED'",
        "priority": "0",
        "data": "jsonb_build_object('n', g)",
        "attempts": "0",
        "not_before": "now() - interval '1 minute'",
        "expires_at": EXPIRIES[expiry],
        "created_at": "now() - interval '1 hour' + g * interval '1 microsecond'",
        "modified_at": "now() - interval '1 hour'",
    }
    names, values, params = [], [], {"scheduler": scheduler, "count": count}
    for field in Task._meta.concrete_fields:
        names.append(connection.ops.quote_name(field.column))
        if field.column in given:
            values.append(given[field.column])
        elif field.null:
            values.append("NULL")
        else:
            params[f"d_{field.column}"] = field.get_db_prep_save(field.get_default(), connection)
            values.append(f"%(d_{field.column})s")
    execute(
        f"INSERT INTO {{task}} ({', '.join(names)}) SELECT {', '.join(values)} "
        "FROM generate_series(1, %(count)s) AS g",
        params,
    )


def reset() -> None:
    from django.db import connection

    for scheduler in (SCHEDULER, PLAIN):
        execute(
            "DELETE FROM {event} e USING {task} t "
            "WHERE e.task_id = t.id AND t.scheduler_id = %(s)s",
            {"s": scheduler},
        )
        execute("DELETE FROM {task} WHERE scheduler_id = %(s)s", {"s": scheduler})
    with connection.cursor() as cursor:
        cursor.execute(sql("VACUUM ANALYZE {task}"))


def statements() -> dict[str, str]:
    from tasks import queue

    with_predicate = queue._pop_sql()
    if PREDICATE not in with_predicate:
        sys.exit("perf_flow_expiry: the pop statement no longer has the expiry predicate")
    return {"with": with_predicate, "without": with_predicate.replace(PREDICATE, "")}


def pop_once(sql: str, scheduler: str) -> float:
    """One pop of one task through the statement; its wall time in microseconds."""
    from django.utils import timezone

    from tasks import queue

    params = {"scheduler": scheduler, "now": timezone.now(), "limit": 1, "worker": "bench"}
    start = time.perf_counter()
    popped = queue._fetch_tasks(sql, params)
    elapsed = (time.perf_counter() - start) * 1e6
    if len(popped) != 1:
        raise SystemExit("perf_flow_expiry: the queue ran dry; seed more")
    return elapsed


def run_cell(size: int, expiry: str, pops: int) -> dict[str, Any]:
    reset()
    seed(size, expiry)
    queues = {"with": SCHEDULER, "without": SCHEDULER}
    if expiry == "expired-head":
        seed(size, "none", scheduler=PLAIN)
        queues["without"] = PLAIN
    execute("VACUUM ANALYZE {task}")
    sqls = statements()
    times: dict[str, list[float]] = {"with": [], "without": []}
    for name in times:  # warm-up: plans cached, pages in memory
        for _ in range(BLOCK):
            pop_once(sqls[name], queues[name])
    for block in range(pops // BLOCK):
        order = ("with", "without") if block % 2 == 0 else ("without", "with")
        for name in order:
            times[name].extend(pop_once(sqls[name], queues[name]) for _ in range(BLOCK))
    return {name: summary(values) for name, values in times.items()}


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[int(len(ordered) * 0.9)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller queues, fewer pops")
    args = parser.parse_args()
    configure_environment()
    setup_django()
    from tasks.models import Scheduler

    for scheduler in (SCHEDULER, PLAIN):
        Scheduler.objects.get_or_create(id=scheduler)
    sizes, pops = (QUICK_SIZES, 1_000) if args.quick else (SIZES, 4_000)
    print(f"{'queue':>8} {'expiry':>13} {'with µs':>9} {'without µs':>11} {'ratio':>6}  p90 w/wo")
    for size in sizes:
        for expiry in EXPIRIES:
            cell = run_cell(size, expiry, pops)
            ratio = cell["with"]["median"] / cell["without"]["median"]
            print(
                f"{size:>8} {expiry:>13} {cell['with']['median']:>9.0f} "
                f"{cell['without']['median']:>11.0f} {ratio:>6.2f}  "
                f"{cell['with']['p90']:.0f}/{cell['without']['p90']:.0f}",
                flush=True,
            )
    reset()


if __name__ == "__main__":
    main()
