"""The Celery app of scheduler_site, with each prefork child profiled by cProfile: where a
worker process's CPU per task goes (issue 12). `celery -A bench.profiled_celery worker ...`
with BENCH_PROFILE_DIR set; each child writes `worker.<pid>.pstats` there when it shuts down
(and every 500 tasks, so a child killed by the pool's stop still leaves its figures), the
main process `main.<pid>.pstats`. CPU time (thread_time), not wall time.
Used by `python -m bench.worker_bench --profile DIR`; bench only, never the product's."""

from __future__ import annotations

import cProfile
import os
import time
from pathlib import Path

from celery.signals import (
    task_postrun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from scheduler_site.celery import app

__all__ = ["app"]

_OUT = Path(os.environ.get("BENCH_PROFILE_DIR", "."))
_state: dict[str, object] = {}


def _dump() -> None:
    profile = _state.get("profile")
    if isinstance(profile, cProfile.Profile):
        profile.dump_stats(_OUT / f"{_state['kind']}.{os.getpid()}.pstats")


def _start(kind: str) -> None:
    # CPU time of the profiled thread, not wall time: on a shared machine waits for the
    # database or for a CPU would otherwise swamp what this process spends.
    profile = cProfile.Profile(time.thread_time)
    _state.update(profile=profile, count=0, kind=kind)
    profile.enable()


@worker_init.connect
def _start_main_profile(**_: object) -> None:
    _start("main")  # the consumer: broker reads, acks, hand-off to the pool


@worker_process_init.connect
def _start_profile(**_: object) -> None:
    old = _state.get("profile")
    if isinstance(old, cProfile.Profile):
        old.disable()  # the parent's, inherited through fork
    _start("worker")


@task_postrun.connect
def _count_task(**_: object) -> None:
    count = int(_state.get("count", 0)) + 1  # type: ignore[call-overload]
    _state["count"] = count
    if count % 500 == 0:
        _dump()


@worker_shutdown.connect
@worker_process_shutdown.connect
def _stop_profile(**_: object) -> None:
    profile = _state.get("profile")
    if isinstance(profile, cProfile.Profile):
        profile.disable()
        _dump()
