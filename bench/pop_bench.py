"""Pop, push and report side by side with the peers, on one throwaway PostgreSQL.

    make bench-pop        # scripts/with-postgres.sh --required -- python -m bench.pop_bench

The database runs with production settings (no --tuned: fsync and synchronous_commit on), and
so do this process and gunicorn (DEBUG off, a throwaway SECRET_KEY). Rounds are interleaved,
A B C … A B C …, so that every contender sees the same minutes of this shared machine; each
cell forks N processes that work until the cell's tasks are done (the queue is dry, the
process's share of pushes or reports is sent) or the time cap passes. Before each cell its
tables are refilled and vacuumed, so every round starts from the same state.

Contenders (keys for --only): raw-1, raw-100 (the lean psycopg loop, own minimal table,
autocommit); procrastinate-1 (its manager's `fetch_job`: the query, a dict row, a `Job`),
procrastinate-id-1 (`procrastinate_fetch_job_v2` reading only the id); pgqueuer-1, pgqueuer-100
(its dequeue); ours-1, ours-100, ours-1-1m, ours-100-1m (`tasks.services.task_pop`, with 0 and
--finished finished rows in the popped queue); http-pop-1, http-pop-100, http-push-1,
http-push-100, http-report-1, http-report-100 (the API under gunicorn -w 4, a runner's token);
plain-pop-1, plain-pop-100, plain-push-1, plain-report-1 (bench/plain_views.py, the same
service calls without DRF, without authentication), plain-auth-pop-1, plain-auth-pop-100,
plain-auth-push-1, plain-auth-report-1 (the same behind the API's token check, the action's
permission and the runner's queue reach: the HTTP targets' anchor, "a plain Django view doing
the same work").
Peers whose package is missing are left out, with the reason.

Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import common, pop_ours, pop_peers
from bench.cells import Caller, Spec, run_cell
from bench.pop_report import Entry, Run, report
from tests.support.processes import ServerProcess, process_env

Connect = Callable[[Spec, int], Caller]


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    fill: Callable[[int], None]
    connect: Connect
    server: str = ""  # "", "api" or "plain"
    package: str = ""  # the peer's package, when it needs one

    @property
    def entry(self) -> Entry:
        return Entry(self.key, self.label, "other" if self.server else "own")


def _ours(queue: str) -> Callable[[int], None]:
    return lambda count: pop_ours.fill(queue, count)


def contenders() -> list[Contender]:
    pop, full = _ours(pop_ours.POP_QUEUE), _ours(pop_ours.FULL_QUEUE)

    def empty(_count: int) -> None:
        pop_ours.fill(pop_ours.PUSH_QUEUE, 0)

    o = pop_ours
    return [
        Contender(
            "raw-1", "lean raw psycopg loop, 1", pop_peers.raw_fill, pop_peers.raw_connect(1)
        ),
        Contender(
            "raw-100", "lean raw psycopg loop, 100", pop_peers.raw_fill, pop_peers.raw_connect(100)
        ),
        Contender(
            "procrastinate-1",
            "procrastinate `fetch_job` (its query, dict row, `Job`)",
            pop_peers.procrastinate_fill,
            pop_peers.procrastinate_connect(whole_job=True),
            package="procrastinate",
        ),
        Contender(
            "procrastinate-id-1",
            "procrastinate `procrastinate_fetch_job_v2`, id only",
            pop_peers.procrastinate_fill,
            pop_peers.procrastinate_connect(whole_job=False),
            package="procrastinate",
        ),
        Contender(
            "pgqueuer-1",
            "pgqueuer dequeue, batch 1",
            pop_peers.pgqueuer_fill,
            pop_peers.pgqueuer_connect(1),
            package="pgqueuer",
        ),
        Contender(
            "pgqueuer-100",
            "pgqueuer dequeue, batch 100",
            pop_peers.pgqueuer_fill,
            pop_peers.pgqueuer_connect(100),
            package="pgqueuer",
        ),
        Contender("ours-1", "**ours** `task_pop` limit 1", pop, o.service_connect(o.POP_QUEUE, 1)),
        Contender(
            "ours-100", "**ours** `task_pop` limit 100", pop, o.service_connect(o.POP_QUEUE, 100)
        ),
        Contender(
            "ours-1-1m", "**ours** limit 1, 1M finished", full, o.service_connect(o.FULL_QUEUE, 1)
        ),
        Contender(
            "ours-100-1m",
            "**ours** limit 100, 1M finished",
            full,
            o.service_connect(o.FULL_QUEUE, 100),
        ),
        Contender("http-pop-1", "HTTP pop 1", pop, o.http_pop("/api", 1), "api"),
        Contender("http-pop-100", "HTTP pop 100", pop, o.http_pop("/api", 100), "api"),
        Contender("http-push-1", "HTTP push", empty, o.http_push("/api", 1), "api"),
        Contender("http-push-100", "HTTP batch push 100", empty, o.http_push("/api", 100), "api"),
        Contender("http-report-1", "HTTP report (PATCH)", pop, o.http_report("/api", 1), "api"),
        Contender(
            "http-report-100", "HTTP batch report 100", pop, o.http_report("/api", 100), "api"
        ),
        Contender(
            "plain-pop-1",
            "plain Django view, pop 1",
            pop,
            o.http_pop("/api/plain", 1, token=False),
            "plain",
        ),
        Contender(
            "plain-auth-pop-1",
            "plain Django view with the token and permission checks, pop 1",
            pop,
            o.http_pop("/api/plain-auth", 1),
            "plain",
        ),
        Contender(
            "plain-auth-pop-100",
            "plain Django view with the token and permission checks, pop 100",
            pop,
            o.http_pop("/api/plain-auth", 100),
            "plain",
        ),
        Contender(
            "plain-auth-push-1",
            "plain Django view with the token and permission checks, push",
            empty,
            o.http_push("/api/plain-auth", 1),
            "plain",
        ),
        Contender(
            "plain-auth-report-1",
            "plain Django view with the token and permission checks, report",
            pop,
            o.http_report("/api/plain-auth", 1),
            "plain",
        ),
        Contender(
            "plain-pop-100",
            "plain Django view, pop 100",
            pop,
            o.http_pop("/api/plain", 100, token=False),
            "plain",
        ),
        Contender(
            "plain-push-1",
            "plain Django view, push",
            empty,
            o.http_push("/api/plain", 1, token=False),
            "plain",
        ),
        Contender(
            "plain-report-1",
            "plain Django view, report",
            pop,
            o.http_report("/api/plain", 1, token=False),
            "plain",
        ),
    ]


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--tasks", type=int, default=env_int("BENCH_TASKS", 20_000), help="a contender a round")
    add("--rounds", type=int, default=env_int("BENCH_ROUNDS", 3))
    add("--processes", type=int, default=env_int("BENCH_PROCESSES", 8))
    add("--finished", type=int, default=env_int("BENCH_FINISHED", 1_000_000))
    add("--max-seconds", type=float, default=env_int("BENCH_MAX_SECONDS", 60), help="cell cap")
    add("--http-workers", type=int, default=env_int("BENCH_HTTP_WORKERS", 4))
    add("--only", default=os.environ.get("BENCH_ONLY", ""), help="comma-separated keys")
    add("--quick", action="store_true", help="2,000 tasks, 100,000 finished, 20 s cap")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.finished, args.max_seconds = 2_000, 100_000, 20
    if min(args.tasks, args.rounds, args.processes, args.http_workers) < 1:
        parser.error("--tasks, --rounds, --processes and --http-workers must be positive")
    return args


def chosen(args: argparse.Namespace, run: Run) -> list[Contender]:
    wanted = {key.strip() for key in args.only.split(",") if key.strip()}
    out = []
    for contender in contenders():
        if wanted and contender.key not in wanted:
            continue
        why = pop_peers.missing(contender.package) if contender.package else ""
        if why:
            run.left_out[contender.key] = why
            continue
        out.append(contender)
    return out


def start_servers(args: argparse.Namespace, needed: set[str]) -> dict[str, ServerProcess]:
    env = process_env(database=os.environ["DATABASE_URL"], **common.production_environment())
    env["SECRET_KEY"] = os.environ["SECRET_KEY"]
    servers = {}
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for name, app in (("api", "scheduler_site.wsgi"), ("plain", "bench.plain_wsgi")):
        if name in needed:
            log_file = Path(common.RESULTS_DIR / f"gunicorn-{name}.log")
            server_env = dict(env)
            if os.environ.get("BENCH_PROFILE_DIR"):  # cProfile in each worker (profile_wsgi)
                server_env["BENCH_PROFILE_APP"], app = app, "bench.profile_wsgi"
            server = ServerProcess(
                server_env, log_file, app=app, workers=args.http_workers, threads=1
            )
            server.start()
            for _ in range(args.http_workers * 4):  # every worker loads the app and connects
                server.wait_until_up()
            servers[name] = server
            common.log(f"gunicorn {app} -w {args.http_workers} on {server.url}")
    return servers


def measure(
    args: argparse.Namespace, run: Run, chosen: list[Contender], tokens: tuple[str, str]
) -> None:
    servers = start_servers(args, {c.server for c in chosen if c.server})
    postmaster = common.postmaster_pid() or 0
    load = common.LoadWatch()
    try:
        for number in range(1, args.rounds + 1):
            for contender in chosen:
                contender.fill(args.tasks)
                server = servers.get(contender.server)
                spec = Spec(
                    contender=contender.key,
                    processes=args.processes,
                    tasks=args.tasks,
                    max_seconds=args.max_seconds,
                    connect=contender.connect,
                    port=server.port if server else 0,
                    token=tokens[0],
                    operator_token=tokens[1],
                    postmaster_pid=postmaster,
                    server_pid=server.process.pid if server and server.process else 0,
                )
                load.begin()
                result = run_cell(spec)
                load.end()
                run.results.setdefault(contender.key, []).append(result)
                problem = f"; errors: {result.errors[:1]}" if result.errors else ""
                common.log(
                    f"round {number}/{args.rounds} {contender.key}: {result.items:,} in "
                    f"{result.wall:.2f} s = {result.rate:,.0f}/s{problem}"
                )
    finally:
        for server in servers.values():
            server.kill()
    run.load = load.text()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.configure_environment("pop_bench")
    common.setup_django("pop_bench")
    run = Run(entries=[])
    picked = chosen(args, run)
    run.entries = [c.entry for c in picked]
    run.command = (
        f"python -m bench.pop_bench --tasks {args.tasks} --rounds {args.rounds} "
        f"--processes {args.processes} --finished {args.finished} "
        f"--max-seconds {args.max_seconds:g} --http-workers {args.http_workers}"
        + (f" --only {args.only}" if args.only else "")
    )
    tokens = pop_ours.prepare_queues()
    if any(c.key.endswith("-1m") for c in picked):
        started = time.monotonic()
        pop_ours.grow_finished(args.finished)
        common.log(f"{args.finished:,} finished rows in {time.monotonic() - started:.0f} s")
    run.header = [
        f"{common.server_version()} ({common.database_settings()}), {os.cpu_count()} CPUs;",
        f"{args.processes} processes, {args.tasks:,} tasks a contender a round, {args.rounds}",
        f"interleaved rounds, cap {args.max_seconds:g} s a cell; gunicorn -w {args.http_workers}",
        f"(sync workers), DEBUG off; {args.finished:,} finished rows in the `-1m` queue.",
        f"Machine at the start: `{common.uptime()}`.",
    ]
    measure(args, run, picked, tokens)
    common.write_result("pop_bench", report(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
