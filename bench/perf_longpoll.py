"""Long-poll pop at idle (issue 12 §3): push → popped by a waiting runner, over HTTP.

    scripts/with-postgres.sh --required -- .venv/bin/python -m bench.perf_longpoll [--base DIR]

DATABASE_URL must be a throwaway PostgreSQL database. One gunicorn (production settings,
gthread workers, as docs/deployment.md serves the API); R runner processes each loop on
`POST /api/schedulers/{id}/pop/` with `"wait": 5` (--wait) and a runner's token; the bench
pushes one task at a time over HTTP (operator token) with its send time in `data`, waits
until it was popped, idles a moment, and pushes the next. Latency: the runner's receipt of
the pop's answer minus the push's send time (one machine, one clock); beside it, the push's
own answer time (its share of the latency: the wake-up happens when the push commits,
before it answers). With --base DIR (another source tree, e.g. `git archive main`) each
round serves that tree and this one in turn (A B, then B A), each from a fresh gunicorn, so
before and after run interleaved; the medians of the rounds' p50s and their ratio are
printed.
Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench import common, perf_http

SCHEDULER = "longpoll"


def tokens() -> tuple[str, str]:
    """A runner's and an operator's token, on a fresh pull queue."""
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.db import connection

    from tasks import accounts
    from tasks.roles import OPERATORS, RUNNERS

    common.fresh_queue(SCHEDULER)
    made = []
    for name, role in (("lp-runner", RUNNERS), ("lp-operator", OPERATORS)):
        user, _ = User.objects.get_or_create(username=name)
        user.groups.add(Group.objects.get(name=role))
        made.append(accounts.token_create(user=user)[1])
    connection.close()
    return made[0], made[1]


def runner(port: int, token: str, wait: float, out: Any, stop: Any) -> None:
    while not stop.is_set():
        status, body = perf_http.request(
            port, "POST", f"/api/schedulers/{SCHEDULER}/pop/", {"wait": wait}, token
        )
        received = time.time()
        if status != 200:
            out.put(("error", status))
            return
        for task in json.loads(body)["results"]:
            out.put(("popped", (task["id"], received - task["data"]["sent"])))


class Run:
    """One gunicorn's pushes: push → popped, the push's answer, and each task's send time."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.pushes: list[float] = []
        self.popped: dict[str, float] = {}  # task id: its push's send time


def measure(tree: Path, tokens_: tuple[str, str], args: argparse.Namespace) -> Run:
    runner_token, operator_token = tokens_
    serving = argparse.Namespace(workers=args.workers, worker_class="gthread", threads=args.threads)
    run = Run()
    with perf_http.gunicorn(tree, serving) as (port, _pid):
        out: Any = multiprocessing.Queue()
        stop = multiprocessing.Event()
        procs = [
            multiprocessing.Process(target=runner, args=(port, runner_token, args.wait, out, stop))
            for _ in range(args.runners)
        ]
        for proc in procs:
            proc.start()
        time.sleep(min(2.0, args.wait))  # every runner is waiting
        for _ in range(args.pushes):
            push_one(port, operator_token, out, run)
            time.sleep(args.idle)
        stop.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    return run


def push_one(port: int, operator_token: str, out: Any, run: Run) -> None:
    body = {"data": {"sent": time.time()}}
    status, _ = perf_http.request(
        port, "POST", f"/api/schedulers/{SCHEDULER}/push/", body, operator_token
    )
    run.pushes.append((time.time() - body["data"]["sent"]) * 1000)
    assert status == 201, status
    kind, value = out.get(timeout=30)
    assert kind == "popped", (kind, value)
    run.latencies.append(value[1] * 1000)
    run.popped[value[0]] = body["data"]["sent"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runners", type=int, default=4)
    parser.add_argument("--pushes", type=int, default=60)
    parser.add_argument("--idle", type=float, default=0.2, help="seconds between pushes")
    parser.add_argument("--wait", type=float, default=5, help="each pop's wait, seconds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--base", type=Path, help="a second source tree to serve (before)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    perf_http.configure_environment()
    made = tokens()
    trees = {"new": perf_http.ROOT}
    if args.base:
        for name in ("perf_settings.py", "perf_urls.py"):  # what the bench's settings name
            if args.base.resolve() != perf_http.ROOT:
                shutil.copy(perf_http.ROOT / "bench" / name, args.base / "bench" / name)
        trees = {"base": args.base, **trees}
    runs: dict[str, list[Run]] = {name: [] for name in trees}
    for round_number in range(args.rounds):
        # A B, B A, …: neither tree always runs first (on a warmer database, or a calmer minute).
        order = list(trees.items())[:: -1 if round_number % 2 else 1]
        for name, tree in order:
            run = measure(tree, made, args)
            runs[name].append(run)
            if len(trees) > 1 or args.rounds > 1:
                print(f"round {round_number + 1} {name}: p50 {_p50(run.latencies):.1f} ms")
    for name, tree_runs in runs.items():
        report(name, tree_runs, args)
    if len(trees) > 1:
        base, new = (statistics.median(_p50(r.latencies) for r in runs[n]) for n in trees)
        print(
            f"\nmedian of the rounds' p50: base {base:.1f} ms, new {new:.1f} ms, new/base "
            f"{new / base:.2f}"
        )


def _p50(values: list[float]) -> float:
    return statistics.median(values)


def steps(popped: dict[str, float]) -> dict[str, list[float]]:
    """Where a push → popped goes, from the server's own clock in the rows (one machine, one
    clock): the push's send → its insert's `now` (the request up to the statement), → the pop
    statement's `now` in the woken waiter (the insert, its commit, the NOTIFY, the wake-up)."""
    from tasks.models import TaskEvent

    statuses = ["QUEUED", "DISPATCHED"]
    rows = TaskEvent.objects.filter(task_id__in=list(popped), to_status__in=statuses)
    at: dict[tuple[str, str], float] = {
        (str(task_id), status): when.timestamp()
        for task_id, status, when in rows.values_list("task_id", "to_status", "at")
    }
    out: dict[str, list[float]] = {"push sent → push statement": [], "→ woken pop statement": []}
    for task_id, sent in popped.items():
        queued, leased = at.get((task_id, "QUEUED")), at.get((task_id, "DISPATCHED"))
        if queued is not None and leased is not None:
            out["push sent → push statement"].append((queued - sent) * 1000)
            out["→ woken pop statement"].append((leased - queued) * 1000)
    return out


def report(name: str, runs: list[Run], args: argparse.Namespace) -> None:
    latencies = [value for run in runs for value in run.latencies]
    pushes = [value for run in runs for value in run.pushes]
    parts = steps({task: sent for run in runs for task, sent in run.popped.items()})
    print(
        f"\n{name}: {args.runners} runners waiting (wait {args.wait:g} s each pop), gunicorn -w "
        f"{args.workers} -k gthread --threads {args.threads}, {len(latencies)} pushes at idle "
        f"({len(runs)} x {args.pushes}), {args.idle:.1f} s apart"
    )
    print("| ms | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|")
    for label, values in (
        ("push sent → popped by a waiting runner", latencies),
        ("push sent → push answered", pushes),
        *((f"of which: {label}", values) for label, values in parts.items() if values),
    ):
        ordered = sorted(values)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        median = statistics.median(ordered)
        print(f"| {label} | {median:.1f} | {p90:.1f} | {p99:.1f} | {ordered[-1]:.1f} |")


if __name__ == "__main__":
    main()
