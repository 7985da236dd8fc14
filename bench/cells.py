"""One measured cell: N forked processes, each calling one contender's operation in a loop
until its work runs out (the queue is dry, its share of pushes or reports is done) or the
cell's time cap passes. Each process measures its own CPU (getrusage) and its PostgreSQL
backend's (/proc); the parent measures the servers' and the other backends' over the window.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.common import machine_cpu, own_cpu, process_cpu, tree_cpu

CLIENT_APP = "bench-client"  # application_name of the measuring processes' connections


@dataclass
class Caller:
    """One process's handle on a contender: `call()` does one operation and returns how many
    items it handled (0: nothing left to do)."""

    call: Callable[[], int]
    close: Callable[[], None] = lambda: None
    backend_pid: int = 0


@dataclass(frozen=True)
class Spec:
    """What a child needs to know; forked, so the callables need not pickle."""

    contender: str
    processes: int
    tasks: int
    max_seconds: float
    connect: Callable[[Spec, int], Caller]
    port: int = 0
    token: str = ""  # a runner's (pop, report)
    operator_token: str = ""  # an operator's (push: runners may not push)
    server_pid: int = 0
    postmaster_pid: int = 0

    @property
    def share(self) -> int:
        """Items of each process, where the work is split up front (pushes, reports)."""
        return -(-self.tasks // self.processes)


@dataclass
class CellResult:
    contender: str
    items: int = 0
    calls: int = 0
    wall: float = 0.0
    capped: bool = False
    errors: list[str] = field(default_factory=list)
    client_cpu: float = 0.0  # the measuring processes (getrusage)
    backend_cpu: float = 0.0  # their own PostgreSQL backends (/proc)
    cluster_cpu: float = 0.0  # the whole cluster: every backend, WAL writer, checkpointer …
    server_cpu: float = 0.0  # gunicorn: master and workers
    machine_busy: float = 0.0
    machine_total: float = 0.0

    @property
    def rate(self) -> float:
        return self.items / self.wall if self.wall > 0 else float("nan")

    def per_call_ms(self, seconds: float) -> float:
        return seconds / self.calls * 1000 if self.calls else float("nan")


def _loop(caller: Caller, max_seconds: float) -> dict[str, Any]:
    items = calls = 0
    capped = False
    cpu, backend = own_cpu(), process_cpu(caller.backend_pid) if caller.backend_pid else 0.0
    start = time.monotonic()
    while True:
        got = caller.call()
        calls += 1
        if not got:
            break
        items += got
        if time.monotonic() - start >= max_seconds:
            capped = True
            break
    end = time.monotonic()
    return {
        "items": items,
        "calls": calls,
        "start": start,
        "end": end,
        "capped": capped,
        "client_cpu": own_cpu() - cpu,
        "backend_cpu": (process_cpu(caller.backend_pid) - backend) if caller.backend_pid else 0.0,
    }


def _child(spec: Spec, index: int, barrier: Any, results: Any) -> None:
    """Body of one forked process: connect, wait for the others, loop, report."""
    try:
        caller = spec.connect(spec, index)
    except Exception as exc:
        barrier.abort()
        results.put({"error": f"setup: {exc!r}"[:400]})
        return
    try:
        barrier.wait(timeout=300)
        results.put(_loop(caller, spec.max_seconds))
    except Exception as exc:
        results.put({"error": repr(exc)[:400]})
    finally:
        caller.close()


def _trees(spec: Spec) -> tuple[float, float]:
    """CPU seconds so far of the cluster's process tree and of gunicorn's (reaped included)."""
    cluster = tree_cpu(spec.postmaster_pid) if spec.postmaster_pid else 0.0
    return cluster, tree_cpu(spec.server_pid) if spec.server_pid else 0.0


def run_cell(spec: Spec) -> CellResult:
    from django.db import connections

    connections.close_all()  # no connection may be shared with the forked children
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(spec.processes + 1)
    results = context.Queue()
    children = [
        context.Process(target=_child, args=(spec, i, barrier, results), daemon=True)
        for i in range(spec.processes)
    ]
    for process in children:
        process.start()
    outcome = CellResult(contender=spec.contender)
    started = False
    try:
        barrier.wait(timeout=300)
        trees, mark, started = _trees(spec), machine_cpu(), True
    except Exception as exc:  # BrokenBarrierError: a child failed to connect
        outcome.errors.append(f"start: {exc!r}")
    reports = _collect(results, len(children), timeout=spec.max_seconds + 300)
    if started:
        cluster, server = _trees(spec)
        outcome.cluster_cpu, outcome.server_cpu = cluster - trees[0], server - trees[1]
        busy, total = machine_cpu()
        outcome.machine_busy, outcome.machine_total = busy - mark[0], total - mark[1]
    for process in children:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
    return _merge(outcome, reports)


def _collect(results: Any, count: int, timeout: float) -> list[dict[str, Any]]:
    """One report per child; a child that died without one counts as an error."""
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    for _ in range(count):
        try:
            reports.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
        except queue.Empty:
            reports.append({"error": "a process sent no report (died or hung)"})
    return reports


def _merge(outcome: CellResult, reports: list[dict[str, Any]]) -> CellResult:
    good = [report for report in reports if "error" not in report]
    outcome.errors.extend(report["error"] for report in reports if "error" in report)
    if good:
        outcome.items = sum(r["items"] for r in good)
        outcome.calls = sum(r["calls"] for r in good)
        outcome.wall = max(r["end"] for r in good) - min(r["start"] for r in good)
        outcome.capped = any(r["capped"] for r in good)
        outcome.client_cpu = sum(r["client_cpu"] for r in good)
        outcome.backend_cpu = sum(r["backend_cpu"] for r in good)
    return outcome
