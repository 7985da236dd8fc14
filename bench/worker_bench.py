"""The Celery execution path: push → RUNNING latency at idle, and no-op throughput.

    make bench-worker  # scripts/with-postgres.sh --required -- scripts/with-redis.sh \\
                       #   --required -- .venv/bin/python -m bench.worker_bench [--quick]

It writes to the database in DATABASE_URL,
which must be a throwaway PostgreSQL database, and uses the Redis in TEST_REDIS_URL as the
broker. Real `celery -A scheduler_site worker` processes run the tasks, started as the
end-to-end tests start them; nothing is eager or mocked.

- Latency: one worker (`--pool solo`), a celery scheduler with `demo.echo`; one task at a time
  pushed with `services.task_push` (whose on-commit fast path dispatches it), from the start of
  the push call to the task's RUNNING event, with a random 50-200 ms pause after each task
  finished so the worker is idle at every push. Each sample is split into steps from its
  TaskEvent rows, the time the push call returned and the worker's "received" log line. The
  same again on the embedded default of `make run` (SQLite in a file, kombu's filesystem
  broker), in a child process with its own temporary folder, unless --no-embedded.
- Throughput: one worker with `--pool prefork --concurrency 2`, a celery scheduler with
  `demo.echo` and dispatch_threshold 50; N QUEUED tasks bulk-created, then
  `dispatch.dispatch_all()` every DISPATCH_INTERVAL_SECONDS from this process (the periodic
  dispatcher's job, at its production cadence) while the worker's on-claim fast path keeps the
  broker topped up; from the first dispatch to the last COMPLETED event. The broker's depth
  (DISPATCHED tasks) is sampled every 100 ms, and also replayed exactly from the events.
- procrastinate's worker (bench/worker_peers.py): the same number of no-op jobs through
  `procrastinate worker`, 2 processes of concurrency 1, on the same PostgreSQL; left out with
  the reason when the bench extra is not installed.
- Celery floor: the built-in no-op `celery.accumulate` through the same kind of worker, so the
  throughput can be read against what Celery and Redis alone manage on this machine.

Where the time goes: per-step times from the events and the worker's log, CPU per task of the
worker, PostgreSQL (every backend, short-lived ones too), Redis and this process from /proc,
and the PostgreSQL sessions opened per task.

Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import sys
from pathlib import Path

from bench import common
from bench.worker_latency import embedded_child, measure_latency, run_embedded_leg
from bench.worker_peers import measure_procrastinate_worker
from bench.worker_report import report
from bench.worker_setup import LatencyResult, Run
from bench.worker_throughput import measure_celery_floor, measure_throughput

# Ours with one setting changed, each run right after ours in every round: (label, the
# DISPATCH_MESSAGE_BATCH of the dispatcher and the worker or None, the worker's environment).
VARIANTS: tuple[tuple[str, int | None, dict[str, str]], ...] = (
    ("one task a message", 1, {}),
    ("report and next claim in one statement (opt-in)", None, {"WORKER_CLAIM_WITH_REPORT": "1"}),
)

# --- the run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="latency samples a leg")
    parser.add_argument("--tasks", type=int, default=3_000, help="throughput tasks a round")
    parser.add_argument("--warmup", type=int, default=100, help="throughput warm-up tasks")
    parser.add_argument("--threshold", type=int, default=50, help="throughput dispatch_threshold")
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(os.environ.get("BENCH_ROUNDS", "3")),
        help="interleaved throughput rounds, A B C A B C (default BENCH_ROUNDS or 3)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="cProfile our worker's pool processes into this folder (and report the top "
        "statements when PostgreSQL loaded pg_stat_statements); profiled figures are slower",
    )
    parser.add_argument(
        "--no-variants",
        action="store_true",
        help="leave out ours with one setting changed (VARIANTS: one task a message, the "
        "report and next claim as one statement, opt-in), which each round otherwise runs right "
        "after ours: the before/after of this release's worker changes",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 samples, 500 tasks")
    parser.add_argument(
        "--no-embedded", action="store_true", help="skip the SQLite + filesystem broker leg"
    )
    parser.add_argument("--embedded-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.tasks = 30, 500
    if min(args.samples, args.tasks, args.threshold, args.rounds) < 1:
        parser.error("--samples, --tasks, --threshold and --rounds must be positive")
    return args


def run_round(run: Run, number: int) -> None:
    """One round of the throughput contenders, one after the other: ours, its VARIANTS (unless
    --no-variants), procrastinate's worker, Celery alone. Rounds repeat the same order, so
    drifting load hits each alike."""
    args = run.args
    common.log(f"round {number}/{args.rounds}")
    profile = args.profile if number == 1 else None
    try:
        result, notes = measure_throughput(args.tasks, args.threshold, args.warmup, profile)
        run.throughput.append(result)
        run.notes += [f"round {number}: {note}" for note in notes]
    except RuntimeError as exc:
        run.notes.append(f"round {number}: throughput failed: {exc}".replace("\n", " / ")[:2000])
    for label, batch, environ in () if args.no_variants else VARIANTS:
        try:
            result, notes = measure_throughput(
                args.tasks, args.threshold, args.warmup, None, batch, environ
            )
            run.variants.setdefault(label, []).append(result)
            run.notes += [f"round {number}, {label}: {note}" for note in notes]
        except RuntimeError as exc:
            failed = f"round {number}: {label} failed: {exc}".replace("\n", " / ")
            run.notes.append(failed[:2000])
    peer = measure_procrastinate_worker(args.tasks, args.warmup)
    if isinstance(peer, str):
        if number == 1:
            run.notes.append(f"procrastinate's worker left out: {peer}")
    else:
        run.peer.append(peer)
    try:
        run.floor.append(measure_celery_floor(args.tasks, args.warmup))
    except RuntimeError as exc:
        run.notes.append(f"round {number}: Celery floor failed: {exc}".replace("\n", " / ")[:2000])
    run.loads.append(common.uptime())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.embedded_child:
        common.setup_django("worker_bench", vendor="sqlite")
        return embedded_child(args.embedded_child, args.samples)
    common.configure_environment("worker_bench", redis=True)
    common.setup_django("worker_bench")
    run = Run(args=args, load_start=common.uptime(), versions=common.server_version() + ", Redis")
    common.log(f"{run.versions}; {run.load_start}")
    try:
        run.latency.append(measure_latency("PostgreSQL + Redis", args.samples))
    except RuntimeError as exc:
        run.latency.append(LatencyResult("PostgreSQL + Redis", run.versions, "-", error=str(exc)))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    for number in range(1, args.rounds + 1):
        run_round(run, number)
    if args.profile:
        run.profile = profile_summary(args.profile)
    if not args.no_embedded:
        common.log("embedded leg: SQLite + filesystem broker, in a child process")
        run.latency.append(run_embedded_leg(args.samples))
    common.write_result("worker_bench", report(run))
    return 0


def profile_summary(folder: Path, top: int = 30) -> str:
    """The pool processes' profiles merged, and the main process's: the functions with the
    most CPU time, cumulative and own."""
    out = io.StringIO()
    for kind in ("worker", "main"):
        files = sorted(folder.glob(f"{kind}.*.pstats"))
        if not files:
            out.write(f"no {kind} profile written\n")
            continue
        out.write(f"--- {kind} process{'es' if kind == 'worker' else ''} ---\n")
        stats = pstats.Stats(*map(str, files), stream=out)
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


if __name__ == "__main__":
    sys.exit(main())
