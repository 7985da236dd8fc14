"""The Celery app of scheduler_site with a timestamp at each stage of every task, in the pool
children and in the worker's main process: where a pool process waits (issue 12). Bench only,
never the product's: `celery -A bench.worker_timed_app worker ...` with BENCH_TIMING_DIR set.

Each process appends `(stage, celery task id, time.time())` to a list in memory (a few
microseconds a stage) and writes it as JSON lines to `<dir>/<kind>.<pid>.jsonl` every 500 tasks
and when it shuts down. Stages: in the main process `received` (the consumer made the
request: the message is in hand); in a child `prerun`, `started` (the claim committed),
`refilled` (the refill on claim returned), `completed` (the report committed), `postrun`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.signals import (
    task_postrun,
    task_prerun,
    task_received,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from scheduler_site.celery import app

__all__ = ["app"]

_OUT = Path(os.environ.get("BENCH_TIMING_DIR", "."))
_rows: list[tuple[str, str, float]] = []
_state: dict[str, Any] = {"kind": "main", "current": "", "done": 0}


def _mark(stage: str, task_id: str | None = None) -> None:
    _rows.append((stage, task_id or _state["current"], time.time()))


def _dump() -> None:
    with (_OUT / f"{_state['kind']}.{os.getpid()}.jsonl").open("w") as out:
        for row in _rows:
            out.write(json.dumps(row) + "\n")


def _timed(stage: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        finally:
            _mark(stage)

    return wrapper


@task_received.connect
def _received(request: Any = None, **_: object) -> None:
    _mark("received", request.id if request is not None else "")


@worker_process_init.connect
def _child(**_: object) -> None:
    from tasks import dispatch, services

    _rows.clear()  # the parent's, inherited through fork
    _state["kind"] = "child"
    services.task_start = _timed("started", services.task_start)
    services.task_complete = _timed("completed", services.task_complete)
    dispatch.refill_on_claim = _timed("refilled", dispatch.refill_on_claim)


@task_prerun.connect
def _prerun(task_id: str = "", **_: object) -> None:
    _state["current"] = task_id
    _mark("prerun")


@task_postrun.connect
def _postrun(**_: object) -> None:
    _mark("postrun")
    _state["done"] += 1
    if _state["done"] % 500 == 0:
        _dump()


@worker_shutdown.connect
@worker_process_shutdown.connect
def _shutdown(**_: object) -> None:
    _dump()
