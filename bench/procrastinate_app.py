"""The procrastinate App of the worker bench's peer leg: one no-op task on the bench's
PostgreSQL. `procrastinate --app=bench.procrastinate_app.app worker` runs it; bench-only."""

from __future__ import annotations

import os

import procrastinate

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ["DATABASE_URL"])
)


@app.task(name="bench.noop", queue="bench")
async def noop(**_kwargs: object) -> None:
    """Does nothing: the leg measures procrastinate's own cost per job."""
