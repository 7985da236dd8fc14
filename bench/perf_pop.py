"""Service-layer pop, variants side by side (issue 12), one set a run (--set): `prepare`
(prepared statements on or off, the old full hash/schedule indexes or the partial ones of
migration 0012), `queue-index` (the queue index with or without its id tie-breaker),
`source` (this checkout against another one, e.g. `git archive` of the commit before a
change unpacked in /tmp, named by BENCH_SOURCE).

    scripts/with-postgres.sh --required -- .venv/bin/python -m bench.perf_pop
    BENCH_SOURCE=/tmp/before scripts/with-postgres.sh --required -- \
        .venv/bin/python -m bench.perf_pop --set source --limit 100

DATABASE_URL must be a throwaway PostgreSQL database (production settings, not --tuned).
Each cell: P processes call tasks.services.task_pop(limit=L) in a loop for T seconds; cells
interleaved over the rounds (A B C A B C ...); medians. CPU per call: the clients' own, and
their PostgreSQL backends' (from /proc); task_queue_idx pages read per call (its
pg_statio counters). Figures only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.common import sql

ROOT = Path(__file__).resolve().parent.parent
SCHEDULER = "perfpop"
SEED_SQL = """
    INSERT INTO {task} (id, scheduler_id, status, priority, data, error, traceback,
        attempts, not_before, worker, lease_token, lock_waits, created_at, modified_at)
    SELECT gen_random_uuid(), %(scheduler)s, %(status)s, 0, jsonb_build_object('n', g), '', '',
        0, now() - interval '1 minute', '', '', 0, now() + g * interval '1 microsecond', now()
    FROM generate_series(1, %(count)s) g
"""
OLD_INDEXES = (
    "DROP INDEX IF EXISTS task_hash_idx",
    "DROP INDEX IF EXISTS task_schedule_idx",
    "CREATE INDEX task_hash_idx ON {task} (hash)",
    "CREATE INDEX task_schedule_idx ON {task} (schedule_id, created_at)",
)
NEW_INDEXES = (
    "DROP INDEX IF EXISTS task_hash_idx",
    "DROP INDEX IF EXISTS task_schedule_idx",
    "CREATE INDEX task_hash_idx ON {task} (hash) WHERE hash IS NOT NULL",
    "CREATE INDEX task_schedule_idx ON {task} (schedule_id, created_at) "
    "WHERE schedule_id IS NOT NULL",
)
PREPARED = {"DATABASE_PREPARE_THRESHOLD": "5"}
# The queue index rebuilt before every cell of either variant, so each starts without a dead
# head (the pops of a cell then grow it alike). "no id": the tie-breaker out of the key.
QUEUE_INDEX_WITH_ID = (
    "DROP INDEX IF EXISTS task_queue_idx",
    "CREATE INDEX task_queue_idx ON {task} (scheduler_id, priority, created_at, id) "
    "WHERE status = 'QUEUED'",
)
QUEUE_INDEX_NO_ID = (
    "DROP INDEX IF EXISTS task_queue_idx",
    "CREATE INDEX task_queue_idx ON {task} (scheduler_id, priority, created_at) "
    "WHERE status = 'QUEUED'",
)
# Each set: variant name -> (environment of the popping processes, DDL before its cell).
# A variant's environment may name BENCH_SOURCE: another checkout of the code (e.g. a
# `git archive` of the commit before a change) that its processes run from.
VARIANT_SETS = {
    "prepare": {
        "before (no prepare, full indexes)": ({"DATABASE_PREPARE_THRESHOLD": "off"}, OLD_INDEXES),
        "prepared, full indexes": (PREPARED, OLD_INDEXES),
        "after (prepared, partial indexes)": (PREPARED, NEW_INDEXES),
    },
    "queue-index": {
        "queue index with id": (PREPARED, QUEUE_INDEX_WITH_ID),
        "queue index without id": (PREPARED, QUEUE_INDEX_NO_ID),
    },
    "source": {
        "BENCH_SOURCE": (
            {**PREPARED, "BENCH_SOURCE": os.environ.get("BENCH_SOURCE", "")},
            QUEUE_INDEX_WITH_ID,
        ),
        "this checkout": (PREPARED, QUEUE_INDEX_WITH_ID),
    },
}


def configure_environment() -> None:
    common.configure_environment("perf_pop", run_as=common.standalone("perf_pop"))


def execute(*statements: str, params: dict | None = None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(sql(statement), params)


def seed(queued: int, finished: int) -> None:
    from django.core.management import call_command

    from tasks.models import Scheduler

    call_command("migrate", verbosity=0, interactive=False)
    Scheduler.objects.update_or_create(id=SCHEDULER, defaults={"paused": False})
    execute("DELETE FROM {event}", "DELETE FROM {task}")
    for status, count in (("QUEUED", queued), ("COMPLETED", finished)):
        params = {"scheduler": SCHEDULER, "status": status, "count": count}
        execute(SEED_SQL, params=params)
    execute("VACUUM ANALYZE {task}")


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_pid() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def child(limit: int, seconds: float) -> None:
    import django

    django.setup()
    from tasks import services

    services.task_pop(scheduler_id=SCHEDULER, limit=limit, worker="warm")
    print("ready", flush=True)
    start = float(sys.stdin.readline())  # every child connected and warmed: the clock starts
    backend = backend_pid()
    time.sleep(max(0.0, start - time.time()))
    cpu, pg_cpu = time.process_time(), process_cpu(backend)
    popped, end = 0, start + seconds
    while time.time() < end:
        popped += len(services.task_pop(scheduler_id=SCHEDULER, limit=limit, worker="perf"))
    print(popped, time.process_time() - cpu, process_cpu(backend) - pg_cpu, flush=True)


def queue_index_pages() -> int:
    """Buffer reads of task_queue_idx so far (statistics survive a cell whose DDL leaves the
    index alone: main() takes the difference around each cell)."""
    from django.db import connection

    time.sleep(1)  # the children's backends report their counters as they exit
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT coalesce(sum(idx_blks_hit + idx_blks_read), 0) FROM pg_statio_user_indexes"
            " WHERE indexrelname = 'task_queue_idx'"
        )
        return int(cursor.fetchone()[0])


def run_cell(env: dict[str, str], args: argparse.Namespace) -> tuple[float, float, float, int]:
    command = [sys.executable, "-m", "bench.perf_pop", "--child", str(args.limit)]
    command.append(str(args.seconds))
    procs = [
        subprocess.Popen(
            command,
            cwd=env.get("BENCH_SOURCE") or ROOT,
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(args.processes)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    start = time.time() + 0.2
    for proc in procs:
        proc.stdin.write(f"{start}\n")
        proc.stdin.flush()
    outputs = [proc.communicate()[0].split() for proc in procs]
    pg_cpu = sum(float(out[2]) for out in outputs)
    popped = sum(int(out[0]) for out in outputs)
    client_cpu = sum(float(out[1]) for out in outputs)
    calls = max(popped / args.limit, 1)
    return popped / args.seconds, 1000 * client_cpu / calls, 1000 * pg_cpu / calls, calls


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        configure_environment()
        child(int(sys.argv[2]), float(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--limit", type=int, default=1)
    parser.add_argument("--finished", type=int, default=10_000)
    parser.add_argument("--queued", type=int, default=400_000)
    parser.add_argument("--set", choices=sorted(VARIANT_SETS), default="prepare")
    args = parser.parse_args()
    if args.set == "source" and not os.environ.get("BENCH_SOURCE"):
        parser.error("--set source compares with another checkout: set BENCH_SOURCE to it")
    configure_environment()
    import django

    django.setup()
    seed(args.queued, args.finished)
    results: dict[str, list[tuple[float, float, float]]] = {}
    for number in range(args.rounds):
        for name, (env, ddl) in VARIANT_SETS[args.set].items():
            execute(*ddl)
            before = queue_index_pages()
            outcome = run_cell(env, args)
            pages = (queue_index_pages() - before) / max(outcome[3], 1)
            results.setdefault(name, []).append((*outcome[:3], pages))
            print(
                f"round {number + 1} {name}: {outcome[0]:.0f} tasks/s, client "
                f"{outcome[1]:.3f} + PostgreSQL {outcome[2]:.3f} ms CPU/call, "
                f"{pages:.1f} queue index pages/call; {os.getloadavg()[0]:.2f} load",
                flush=True,
            )
    report(results, args)


def report(results: dict[str, list[tuple[float, ...]]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.processes} processes, limit {args.limit}, {args.finished} finished rows, "
        f"{args.rounds} rounds x {args.seconds:.0f} s interleaved, medians (min-max); ratio: "
        "median of the per-round ratios to the first variant"
    )
    print(
        "| variant | tasks/s | min-max | ratio | client ms CPU/call | PostgreSQL ms CPU/call "
        "| queue index pages/call |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    first = next(iter(results.values()))
    for name, values in results.items():
        rates = [value[0] for value in values]
        ratios = [v[0] / f[0] for v, f in zip(values, first, strict=True) if f[0]]
        ratio = statistics.median(ratios) if ratios else float("nan")  # a queue run dry
        client, pg, pages = (statistics.median(value[i] for value in values) for i in (1, 2, 3))
        print(
            f"| {name} | {statistics.median(rates):.0f} | {min(rates):.0f}-{max(rates):.0f} "
            f"| {ratio:.2f}x | {client:.3f} | {pg:.3f} | {pages:.1f} |"
        )


if __name__ == "__main__":
    main()
