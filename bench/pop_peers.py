"""The peers of the pop bench, each on its own tables in the same throwaway PostgreSQL:

- the lean raw loop: psycopg in autocommit on a minimal table of its own,
  `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1)` (batch: `id IN (… LIMIT 100)`);
- procrastinate: its schema applied as its SchemaManager would, its jobs inserted through its
  own defer function's table (the insert triggers run), then its manager's `fetch_job` query
  (`procrastinate_fetch_job_v2`) called as its worker calls it (autocommit, one job a call; it
  has no batch fetch), the row made into its `Job`; and the same call reading only the id;
- pgqueuer: its schema installed by its own `Queries.install()`, jobs enqueued by its
  `SyncQueries.enqueue`, then its own `Queries.dequeue` (asyncio over psycopg, as its
  worker runs), batch 1 and 100.

A peer whose package is not installed (`pip install -e '.[bench]'`) is left out with a note.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import uuid
from datetime import timedelta

from bench.cells import CLIENT_APP, Caller, Spec

RAW_TABLE = "bench_raw_job"  # the raw loop's own table: no model of ours
RAW_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {RAW_TABLE} (id bigserial PRIMARY KEY, "
    "priority integer NOT NULL DEFAULT 0, status text NOT NULL DEFAULT 'todo', "
    "taken_at timestamptz, payload jsonb NOT NULL DEFAULT '{}')",
    f"CREATE INDEX IF NOT EXISTS {RAW_TABLE}_todo ON {RAW_TABLE} (priority, id) "
    "WHERE status = 'todo'",
)
RAW_POP_SQL = (
    f"UPDATE {RAW_TABLE} SET status = 'doing', taken_at = now() WHERE id {{match}} "
    f"(SELECT id FROM {RAW_TABLE} WHERE status = 'todo' ORDER BY priority, id "
    "FOR UPDATE SKIP LOCKED LIMIT %s) RETURNING id"
)
PROCRASTINATE_QUEUE = "bench"
PGQUEUER_ENTRYPOINT = "bench"


def missing(package: str) -> str:
    """Why a peer is left out, or '' when its package is importable."""
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (`pip install -e '.[bench]'`, as `make bench-pop` does)"
    return ""


def _connect(autocommit: bool = True):  # -> psycopg.Connection
    import psycopg

    return psycopg.connect(
        os.environ["DATABASE_URL"], autocommit=autocommit, application_name=CLIENT_APP
    )


# --- the lean raw loop -----------------------------------------------------------------------


def raw_fill(count: int) -> None:
    with _connect() as conn:
        for statement in RAW_SCHEMA:
            conn.execute(statement)
        conn.execute(f"TRUNCATE {RAW_TABLE}")
        conn.execute(
            f"INSERT INTO {RAW_TABLE} (priority, payload) "
            "SELECT g %% 4, jsonb_build_object('n', g) FROM generate_series(1, %s) AS g",
            (count,),
        )
        conn.execute(f"VACUUM ANALYZE {RAW_TABLE}")


def raw_connect(limit: int):  # -> Callable[[Spec, int], Caller]
    sql = RAW_POP_SQL.format(match="=" if limit == 1 else "IN")

    def connect(spec: Spec, index: int) -> Caller:
        conn = _connect()

        def call() -> int:
            return len(conn.execute(sql, (limit,)).fetchall())

        return Caller(call, conn.close, conn.info.backend_pid)

    return connect


# --- procrastinate ---------------------------------------------------------------------------


def procrastinate_fill(count: int) -> None:
    """Its schema (once), no job, event or worker left, then `count` jobs to fetch."""
    procrastinate_reset(workers=True)
    procrastinate_insert(count)
    with _connect() as conn:
        conn.execute("VACUUM ANALYZE procrastinate_jobs")
        conn.execute("VACUUM ANALYZE procrastinate_events")


def procrastinate_reset(*, workers: bool) -> None:
    from procrastinate.schema import SchemaManager

    with _connect() as conn:
        installed = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0]
        if installed is None:
            conn.execute(SchemaManager.get_schema())
        tables = "procrastinate_events, procrastinate_jobs"
        conn.execute(f"TRUNCATE {tables}{', procrastinate_workers' if workers else ''} CASCADE")


def procrastinate_insert(count: int) -> None:
    """`count` jobs in one statement; its insert triggers run (events, NOTIFY)."""
    with _connect() as conn:
        conn.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args) "
            "SELECT %s, 'bench.noop', 0, jsonb_build_object('n', g) "
            "FROM generate_series(1, %s) AS g",
            (PROCRASTINATE_QUEUE, count),
        )


def procrastinate_connect(*, whole_job: bool):  # -> Callable[[Spec, int], Caller]
    """procrastinate's fetch as its worker makes it: its manager's `fetch_job` query (the
    job's columns), read through a dict-row cursor as its connector does, made into a `Job`
    (`whole_job`); or only the job's id, which hands out the same job with less client work."""

    def connect(spec: Spec, index: int) -> Caller:
        conn = _connect()
        # A worker registers itself first (procrastinate_register_worker_v1), as its worker does.
        worker_id = conn.execute("SELECT procrastinate_register_worker_v1()").fetchone()[0]
        params = {"queues": [PROCRASTINATE_QUEUE], "worker_id": worker_id}
        call = _procrastinate_fetch(conn, params) if whole_job else _procrastinate_id(conn, params)
        return Caller(call, conn.close, conn.info.backend_pid)

    return connect


def _procrastinate_fetch(conn, params: dict):  # -> Callable[[], int]
    from procrastinate import jobs
    from procrastinate.sql import queries
    from psycopg.rows import dict_row

    query = queries["fetch_job"]

    def call() -> int:
        # JobManager.fetch_job: one cursor per query (its connector's _get_cursor), then
        # Job.from_row unless the function found nothing (a row of NULLs).
        with conn.cursor(row_factory=dict_row) as cursor:
            row = cursor.execute(query, params).fetchone()
        if row is None or row["id"] is None:
            return 0
        jobs.Job.from_row(row)
        return 1

    return call


def _procrastinate_id(conn, params: dict):  # -> Callable[[], int]
    query = "SELECT id FROM procrastinate_fetch_job_v2(%(queues)s::varchar[], %(worker_id)s)"

    def call() -> int:
        row = conn.execute(query, params).fetchone()
        return 0 if row is None or row[0] is None else 1

    return call


# --- pgqueuer --------------------------------------------------------------------------------


def pgqueuer_fill(count: int, chunk: int = 5_000) -> None:
    from pgqueuer.db import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries

    with _connect() as conn:
        installed = conn.execute("SELECT to_regclass('pgqueuer')").fetchone()[0]
        if installed is None:
            asyncio.run(_pgqueuer_install())
        conn.execute("TRUNCATE pgqueuer")
        queries = SyncQueries(SyncPsycopgDriver(conn))
        for start in range(0, count, chunk):
            size = min(chunk, count - start)
            queries.enqueue([PGQUEUER_ENTRYPOINT] * size, [None] * size, [0] * size)
        conn.execute("VACUUM ANALYZE pgqueuer")


async def _pgqueuer_install() -> None:
    import psycopg
    from pgqueuer.queries import Queries

    conn = await psycopg.AsyncConnection.connect(os.environ["DATABASE_URL"], autocommit=True)
    async with conn:
        await Queries.from_psycopg_connection(conn).install()


def pgqueuer_connect(limit: int):  # -> Callable[[Spec, int], Caller]
    def connect(spec: Spec, index: int) -> Caller:
        import psycopg
        from pgqueuer.queries import EntrypointExecutionParameter, Queries

        loop = asyncio.new_event_loop()
        conn = loop.run_until_complete(
            psycopg.AsyncConnection.connect(
                os.environ["DATABASE_URL"], autocommit=True, application_name=CLIENT_APP
            )
        )
        queries = Queries.from_psycopg_connection(conn)
        entrypoints = {PGQUEUER_ENTRYPOINT: EntrypointExecutionParameter(concurrency_limit=0)}
        manager = uuid.uuid4()

        def call() -> int:
            jobs = loop.run_until_complete(
                queries.dequeue(limit, entrypoints, manager, None, timedelta(seconds=30))
            )
            return len(jobs)

        def close() -> None:
            loop.run_until_complete(conn.close())
            loop.close()

        return Caller(call, close, conn.info.backend_pid)

    return connect
