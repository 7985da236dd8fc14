"""HTTP pop against a plain Django view doing the same service call, interleaved (issue 12).

    scripts/with-postgres.sh --required -- .venv/bin/python -m bench.perf_http [--base DIR]

DATABASE_URL must be a throwaway PostgreSQL database. One gunicorn (production settings,
DEBUG off, bench/perf_settings.py for the extra URL) serves both `POST
/api/schedulers/perf/pop/` (DRF, knox token of a runner account with a queue grant) and
`POST /perf/plain-pop/perf/` (plain view, no auth). With --base DIR a second gunicorn serves
the same from another source tree (e.g. `git archive main`), so before and after run in the
same rounds. N client processes per cell; cells interleaved over the rounds; medians.
Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import common
from bench.common import sql
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
SCHEDULER = "perf"
SEED_SQL = """
    INSERT INTO {task} (id, scheduler_id, status, priority, data, error, traceback,
        attempts, not_before, worker, lease_token, lock_waits, created_at, modified_at)
    SELECT gen_random_uuid(), %(scheduler)s, 'QUEUED', 0, jsonb_build_object('n', g), '', '',
        0, now() - interval '1 minute', '', '', 0, now() + g * interval '1 microsecond', now()
    FROM generate_series(1, %(count)s) g
"""


def configure_environment() -> None:
    common.configure_environment("perf_http", run_as=common.standalone("perf_http"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.perf_settings"  # adds the plain view's URL
    os.environ.setdefault("API_THROTTLE_USER", "100000000/min")


def prepare(count: int) -> str:
    """Migrate, (re)create the queue with `count` due tasks, and a limited runner's token."""
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.db import connection

    from tasks import accounts
    from tasks.roles import RUNNERS

    common.fresh_queue(SCHEDULER)
    common.execute(sql(SEED_SQL), {"scheduler": SCHEDULER, "count": count})
    common.execute(sql("VACUUM ANALYZE {task}"))
    user, _ = User.objects.get_or_create(username="perf-runner")
    user.groups.add(Group.objects.get(name=RUNNERS))
    accounts.runner_grants_set(user=user, scheduler_ids=[SCHEDULER])
    token = accounts.token_create(user=user)[1]
    connection.close()
    return token


@contextmanager
def gunicorn(tree: Path, args: argparse.Namespace) -> Iterator[tuple[int, int]]:
    port = free_port()
    command = [str(Path(sys.executable).with_name("gunicorn")), "scheduler_site.wsgi"]
    command += ["-w", str(args.workers), "-k", args.worker_class, "-b", f"127.0.0.1:{port}"]
    if args.worker_class == "gthread":
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log = open(f"/tmp/perf_http-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                request(port, "GET", "/healthz", None, "")
                break
            except OSError:
                time.sleep(0.1)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def request(port: int, method: str, url: str, body: Any, token: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", "Host": "127.0.0.1"}
    if token:
        headers["Authorization"] = f"Token {token}"
    conn.request(method, url, body=None if body is None else json.dumps(body), headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def client(port: int, url: str, token: str, seconds: float, barrier: Any, out: Any) -> None:
    barrier.wait()
    done, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        status, data = request(port, "POST", url, {}, token)
        if status != 200 or b'"id"' not in data:
            out.put(-1)
            return
        done += 1
    out.put(done)


def cpu_of_children(pid: int) -> float:
    total = 0.0
    for line in subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout.split():
        with open(f"/proc/{line}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_cell(port: int, pid: int, url: str, token: str, args: argparse.Namespace) -> tuple:
    barrier = multiprocessing.Barrier(args.clients + 1)
    out: Any = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=client, args=(port, url, token, args.seconds, barrier, out))
        for _ in range(args.clients)
    ]
    for proc in procs:
        proc.start()
    cpu = cpu_of_children(pid)
    barrier.wait()
    started = time.monotonic()
    counts = [out.get(timeout=args.seconds + 60) for _ in procs]
    wall = time.monotonic() - started
    cpu = cpu_of_children(pid) - cpu
    for proc in procs:
        proc.join()
    if min(counts) < 0:
        raise RuntimeError(f"a client got an error answer from {url}")
    total = sum(counts)
    return total / wall, 1000 * cpu / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, help="a second source tree to serve (before)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--worker-class", default="sync")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=300_000)
    args = parser.parse_args()
    configure_environment()
    token = prepare(args.tasks)
    trees = {"new": ROOT}
    if args.base:
        for name in ("perf_settings.py", "perf_urls.py"):
            shutil.copy(ROOT / "bench" / name, args.base / "bench" / name)
        trees["base"] = args.base
    rates: dict[str, list[tuple[float, float]]] = {}
    with contextmanager_all(trees, args) as servers:
        for round_number in range(args.rounds):
            for name, (port, pid) in servers.items():
                for label, url, tok in (
                    ("drf pop", f"/api/schedulers/{SCHEDULER}/pop/", token),
                    ("plain view", f"/perf/plain-pop/{SCHEDULER}/", ""),
                ):
                    result = run_cell(port, pid, url, tok, args)
                    rates.setdefault(f"{name} {label}", []).append(result)
                    print(
                        f"round {round_number + 1} {name} {label}: {result[0]:.0f}/s "
                        f"gunicorn {result[1]:.2f} ms CPU/req",
                        flush=True,
                    )
    report(rates, args)


@contextmanager
def contextmanager_all(trees: dict[str, Path], args: argparse.Namespace) -> Iterator[dict]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield {name: stack.enter_context(gunicorn(tree, args)) for name, tree in trees.items()}


def report(rates: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.clients} clients, gunicorn -w {args.workers} -k {args.worker_class}, "
        f"{args.rounds} rounds x {args.seconds:.0f} s, medians (min-max)"
    )
    print("| cell | req/s | min-max | gunicorn CPU ms/req |\n|---|---:|---:|---:|")
    medians = {}
    for name, values in rates.items():
        per_s = [value[0] for value in values]
        medians[name] = statistics.median(per_s)
        cpu = statistics.median(value[1] for value in values)
        print(f"| {name} | {medians[name]:.0f} | {min(per_s):.0f}-{max(per_s):.0f} | {cpu:.2f} |")
    for tree in ("base", "new"):
        if f"{tree} drf pop" in medians:
            ratio = medians[f"{tree} drf pop"] / medians[f"{tree} plain view"]
            print(f"{tree}: DRF pop / plain view = {ratio:.2f}")


if __name__ == "__main__":
    main()
