"""Where a pool process waits: every task's stages timed in the pool children and in the
worker's main process (bench/worker_timed_app.py), for our no-op path and for Celery alone,
variants of the worker's options interleaved over rounds (issue 12).

    scripts/with-postgres.sh --required -- scripts/with-redis.sh --required -- \\
        .venv/bin/python -m bench.worker_waits [--tasks 2000] [--rounds 3] \\
        [--variant NAME=OPTIONS ...]

A variant is a name and the extra `celery worker` options it runs with (e.g.
`pf4=--prefetch-multiplier 4`); `base` (no extra options) always runs. Per leg it prints the
rate and, per task (medians, ms): the child's busy time (prerun → postrun) and the stages in
it, the child's idle gap until its next task, and how long the next message had been in the
main process when the child took it. Figures only; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench import common
from bench.worker_peers import measure_procrastinate_worker
from bench.worker_setup import (
    THROUGHPUT_CONCURRENCY,
    THROUGHPUT_SCHEDULER,
    WORKER_READY_SECONDS,
    clear_tasks,
    reset_scheduler,
    seed_queued,
    vacuum_tasks,
    worker_env,
)
from bench.worker_throughput import drain, send_noops, wait_succeeded
from tests.support.processes import WorkerProcess, purge_broker

APP = "bench.worker_timed_app"
CHILD_STAGES = ("prerun", "started", "refilled", "completed", "postrun")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threshold", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=100, help="warm-up tasks a leg")
    parser.add_argument("--no-floor", action="store_true", help="only our path")
    parser.add_argument(
        "--peer", action="store_true", help="procrastinate's worker too, once a round (its rate)"
    )
    parser.add_argument("--variant", action="append", default=[], help="NAME=worker options")
    return parser.parse_args(argv)


def _worker(name: str, folder: Path, options: list[str], env_extra: dict[str, str]) -> Any:
    purge_broker()
    env = worker_env() | {"BENCH_TIMING_DIR": str(folder)} | env_extra
    return WorkerProcess(
        f"{name}-{os.getpid()}", env, "prefork", THROUGHPUT_CONCURRENCY,
        options=options, ready_seconds=WORKER_READY_SECONDS, app=APP,
    )  # fmt: skip


class ActivitySampler(threading.Thread):
    """Every 2 ms, what each other client backend is doing (state, wait event): where the
    database side of our workers waits."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.bench_pid = int(common.fetchone("SELECT pg_backend_pid()")[0])
        self.stop = threading.Event()
        self.seen: Counter[str] = Counter()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
            while not self.stop.wait(0.002):
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event, left(query, 30) "
                    "FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid() AND pid <> %s",
                    [self.bench_pid],
                ).fetchall()
                for state, kind, event, query in rows:
                    what = f"{state} {kind}:{event}"
                    if state == "active":
                        what += " " + " ".join(query.split())
                    self.seen[what] += 1


ACTIVITY: dict[str, Counter[str]] = defaultdict(Counter)  # by leg/variant
CURRENT = {"label": ""}


def run_ours(folder: Path, options: list[str], env: dict[str, str], args: Any) -> float:
    """Our no-op path, as the worker bench's throughput leg; returns the measured start."""
    reset_scheduler(THROUGHPUT_SCHEDULER, threshold=args.threshold)
    worker = _worker("waits", folder, options, env)
    try:
        seed_queued(THROUGHPUT_SCHEDULER, args.warmup)
        drain(args.warmup, 120)
        clear_tasks(THROUGHPUT_SCHEDULER)
        seed_queued(THROUGHPUT_SCHEDULER, args.tasks)
        vacuum_tasks()
        sampler = ActivitySampler()
        sampler.start()
        started, *_ = drain(args.tasks, max(120.0, args.tasks / 20))
        sampler.stop.set()
        sampler.join()
        ACTIVITY[CURRENT["label"]].update(sampler.seen)
    finally:
        worker.stop()
        purge_broker()
    return started


def run_floor(folder: Path, options: list[str], env: dict[str, str], args: Any) -> float:
    worker = _worker("waits-floor", folder, options, env)
    try:
        mark = len(worker.lines)
        send_noops(args.warmup)
        wait_succeeded(worker, mark, args.warmup, 60)
        mark, started = len(worker.lines), time.time()
        send_noops(args.tasks)
        wait_succeeded(worker, mark, args.tasks, max(60.0, args.tasks / 20))
    finally:
        worker.stop()
        purge_broker()
    return started


def load_rows(folder: Path, since: float) -> tuple[dict[str, list[Any]], dict[str, float]]:
    """(child pid → its rows after `since`, task id → when the main process received it)."""
    children: dict[str, list[Any]] = {}
    received: dict[str, float] = {}
    for path in folder.glob("*.jsonl"):
        kind, pid, _ = path.name.split(".")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [row for row in rows if row[2] >= since]
        if kind == "main":
            received.update({task: at for _stage, task, at in rows})
        else:
            children[pid] = sorted(rows, key=lambda row: row[2])
    return children, received


def analyse(folder: Path, since: float) -> dict[str, float]:
    children, received = load_rows(folder, since)
    steps: dict[str, list[float]] = defaultdict(list)
    first, last, count = float("inf"), 0.0, 0
    for rows in children.values():
        tasks: dict[str, dict[str, float]] = {}
        order: list[str] = []
        for stage, task, at in rows:
            if task not in tasks:
                order.append(task)
            tasks.setdefault(task, {})[stage] = at
        for number, task in enumerate(order):
            stages = tasks[task]
            if "prerun" not in stages or "postrun" not in stages:
                continue
            count += 1
            first, last = min(first, stages["prerun"]), max(last, stages["postrun"])
            steps["busy"].append(stages["postrun"] - stages["prerun"])
            here = [s for s in CHILD_STAGES if s in stages]
            for a, b in itertools.pairwise(here):
                steps[f"{a}>{b}"].append(stages[b] - stages[a])
            if task in received:
                steps["in main before prerun"].append(stages["prerun"] - received[task])
            if number + 1 < len(order):
                after = tasks[order[number + 1]]
                if "prerun" in after:
                    steps["idle gap"].append(after["prerun"] - stages["postrun"])
                    nxt = order[number + 1]
                    if nxt in received:
                        steps["next received - postrun"].append(received[nxt] - stages["postrun"])
    out = {name: statistics.median(values) * 1000 for name, values in steps.items()}
    out |= {f"{name} (mean)": statistics.fmean(values) * 1000 for name, values in steps.items()}
    out["tasks/s"] = count / (last - first) if last > first else float("nan")
    out["tasks"] = count
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    how = "scripts/with-postgres.sh --required -- scripts/with-redis.sh --required -- python"
    common.configure_environment("worker_waits", redis=True, run_as=f"{how} -m bench.worker_waits")
    common.setup_django("worker_waits")
    variants: list[tuple[str, list[str], dict[str, str]]] = [("base", [], {})]
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        env = dict(w.split("=", 1) for w in shlex.split(rest) if "=" in w and w[0] != "-")
        opts = [w for w in shlex.split(rest) if not ("=" in w and w[0] != "-")]
        variants.append((name, opts, env))
    legs = [("ours", run_ours)] + ([] if args.no_floor else [("floor", run_floor)])
    results: dict[str, list[dict[str, float]]] = defaultdict(list)
    for number in range(1, args.rounds + 1):
        for leg, run in legs:
            for name, options, env in variants:
                CURRENT["label"] = f"{leg}/{name}"
                with tempfile.TemporaryDirectory() as tmp:
                    since = run(Path(tmp), options, env, args)
                    time.sleep(0.5)
                    figures = analyse(Path(tmp), since)
                results[f"{leg}/{name}"].append(figures)
                common.log(f"round {number} {leg}/{name}: {figures['tasks/s']:.0f} tasks/s")
        if args.peer:
            peer = measure_procrastinate_worker(args.tasks, args.warmup)
            if not isinstance(peer, str):
                results["procrastinate"].append({"tasks/s": peer.rate, "tasks": peer.completed})
        common.log(common.uptime())
    report(results)
    return 0


def report(results: dict[str, list[dict[str, float]]]) -> None:
    keys: list[str] = []
    for runs in results.values():
        for run in runs:
            keys += [k for k in run if k not in keys]
    print("\nmedian over rounds (ms per task unless said)")
    print("| figure | " + " | ".join(results) + " |")
    for key in keys:
        cells = []
        for runs in results.values():
            values = [run[key] for run in runs if key in run]
            cells.append(f"{statistics.median(values):.3f}" if values else "-")
        print(f"| {key} | " + " | ".join(cells) + " |")
    for label, runs in results.items():
        print(label, "rounds tasks/s:", [round(run["tasks/s"]) for run in runs])
    for label, seen in ACTIVITY.items():
        print(f"pg_stat_activity samples of the other client backends, {label}:")
        for what, n in seen.most_common(12):
            print(f"  {n:7d}  {what}")


if __name__ == "__main__":
    sys.exit(main())
