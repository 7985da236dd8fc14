"""Where a flow-controlled pop's cost goes, against the plain pop (issue 15 part 8): per pop,
the wall time, this process's CPU, the backend's CPU (/proc), the WAL written, and (when the
server loads pg_stat_statements) each statement's execution time and buffers.

    scripts/with-postgres.sh --required -- .venv/bin/python -m bench.perf_flow_profile \
        [--pops 1000] [--cprofile CELL]

With WITH_POSTGRES_OPTIONS="-c shared_preload_libraries=pg_stat_statements -c
pg_stat_statements.track_planning=on" it also shows how often each statement was planned and
how long that took (a prepared flow pop is planned a few times, then runs its generic plan).
`--cprofile CELL` also prints the top functions of this process's CPU for that cell's pops.
Figures only, no assertion; the queues are those of perf_flow_rate/_fair/_concurrency.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import common
from bench.perf_flow_common import fresh_queue, seed

SIZE = 20_000


@dataclass
class Cell:
    name: str
    settings: dict[str, Any]
    data: Callable[[int], dict[str, Any]]
    walls: list[float] = field(default_factory=list)
    client: float = 0.0
    backend: float = 0.0
    wal_bytes: int = 0
    pops: int = 0


CELLS = [
    Cell("plain", {}, lambda n: {"org": n % 100}),
    Cell("rate", {"rate_limit": "100000/s"}, lambda n: {"org": n % 100}),
    Cell(
        "concurrency",
        {"concurrency_key": "org", "concurrency_limit": 1000},
        lambda n: {"org": n % 100},
    ),
    Cell(
        "crowded",
        {"concurrency_key": "org", "concurrency_limit": 1},
        lambda n: {"org": "big" if n % 2 else f"o{n}"},
    ),
    Cell("fair", {"fair_key": "org"}, lambda n: {"org": "big" if n % 2 else n % 1000}),
]


def _wal() -> int:
    """Bytes of WAL written so far (pg_stat_wal reaches its view only now and then; the
    insert position is exact)."""
    (position,) = common.fetchone("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
    return int(position)


def _block(cell: Cell, pops: int, backend_pid: int, profile: cProfile.Profile | None) -> None:
    from tasks import services

    size = _wal()
    cpu, server = time.process_time(), common.process_cpu(backend_pid)
    if profile is not None:
        profile.enable()
    for _ in range(pops):
        started = time.perf_counter()
        if not services.task_pop(scheduler_id=f"prof-{cell.name}", limit=1, worker="bench"):
            raise SystemExit(f"{cell.name}: queue ran dry")
        cell.walls.append((time.perf_counter() - started) * 1e6)
    if profile is not None:
        profile.disable()
    cell.client += time.process_time() - cpu
    cell.backend += common.process_cpu(backend_pid) - server
    cell.wal_bytes += _wal() - size
    cell.pops += pops


def _statements() -> list[tuple[Any, ...]]:
    try:
        return _rows(
            "SELECT calls, total_exec_time, shared_blks_hit + shared_blks_read, "
            "wal_records, plans, total_plan_time, "
            "left(regexp_replace(query, '\\s+', ' ', 'g'), 90) "
            "FROM pg_stat_statements WHERE calls >= 100 ORDER BY total_exec_time DESC LIMIT 12"
        )
    except Exception:  # the extension is optional
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description="where a flow pop's cost goes")
    parser.add_argument("--pops", type=int, default=1000)
    parser.add_argument("--cprofile", default="")
    args = parser.parse_args()
    common.configure_environment("perf_flow_profile", run_as=common.standalone("perf_flow_profile"))
    os.environ.setdefault("CELERY_BROKER_URL", "filesystem://")
    common.setup_django("perf_flow_profile")
    for cell in CELLS:
        fresh_queue(f"prof-{cell.name}", **cell.settings)
        seed(f"prof-{cell.name}", SIZE, cell.data)
    if _has_pgss():
        common.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    backend = int(common.fetchone("SELECT pg_backend_pid()")[0])
    profile = cProfile.Profile(time.process_time) if args.cprofile else None
    for cell in CELLS:
        _block(cell, 10, backend, None)  # warm: prepared statements, caches
        cell.walls.clear()
        cell.client = cell.backend = cell.wal_bytes = cell.pops = 0
    if _has_pgss():
        common.execute("SELECT pg_stat_statements_reset()")
    for _ in range(args.pops // 10):
        for cell in CELLS:
            _block(cell, 10, backend, profile if cell.name == args.cprofile else None)
    _report(args, profile)


def _rows(sql: str) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def _has_pgss() -> bool:
    return bool(
        common.fetchone(
            "SELECT count(*) FROM pg_settings WHERE name = 'shared_preload_libraries' "
            "AND setting LIKE '%%pg_stat_statements%%'"
        )[0]
    )


def _report(args: argparse.Namespace, profile: cProfile.Profile | None) -> None:
    plain = CELLS[0]
    print(common.uptime())
    print(
        f"{'cell':12} {'wall us':>8} {'x':>5} {'client':>7} {'backend':>8} {'x':>5} "
        f"{'WAL rec':>8} {'WAL B':>7}"
    )
    for cell in CELLS:
        wall = statistics.median(cell.walls)
        backend = cell.backend / cell.pops * 1e6
        print(
            f"{cell.name:12} {wall:8.0f} {wall / statistics.median(plain.walls):5.2f} "
            f"{cell.client / cell.pops * 1e6:7.0f} {backend:8.0f} "
            f"{backend / (plain.backend / plain.pops * 1e6):5.2f} "
            f"{cell.wal_bytes / cell.pops:7.0f}"
        )
    for calls, total, buffers, wal, plans, planning, query in _statements():
        plan = f"{planning / plans * 1000:5.0f} us/plan x{plans}" if plans else ""
        print(
            f"{calls:6} {total / calls * 1000:7.0f} us {buffers / calls:6.1f} buf "
            f"{wal / calls:5.1f} wal {plan} {query}"
        )
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
