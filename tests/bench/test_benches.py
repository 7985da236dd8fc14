"""Each bench, run as `make bench-*` runs it but with tiny sizes, against the test database:
it must finish, measure every contender it has, and print its markdown tables. Figures are
not checked (no timing assertions); only that the tool works. PostgreSQL only, as the benches.
The peers (procrastinate, pgqueuer) are measured when the bench extra is installed; without
it the pop bench must say that it left them out, and why."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from django.db import connection

from tests.support.processes import ROOT, database_url

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

POP_KEYS = (
    "raw-1,raw-100,procrastinate-1,procrastinate-id-1,pgqueuer-1,pgqueuer-100,ours-1,ours-100,ours-1-1m,"
    "http-pop-1,http-push-1,http-push-100,http-report-1,http-report-100,plain-pop-1,"
    "plain-auth-pop-1,plain-auth-pop-100,plain-auth-push-1,plain-auth-report-1"
)


def run_bench(module: str, *args: str, **environ: str) -> str:
    env = {**os.environ, "DATABASE_URL": database_url(connection.settings_dict, "postgresql")}
    env.update(environ)
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return done.stdout


def test_pop_bench__tiny_run_measures_every_contender_and_prints_the_tables() -> None:
    out = run_bench(
        "bench.pop_bench",
        *("--tasks", "40", "--rounds", "1", "--processes", "2", "--finished", "100"),
        *("--http-workers", "1", "--max-seconds", "10", "--only", POP_KEYS),
    )
    assert "## Throughput (median of the interleaved rounds)" in out
    assert "| **ours** `task_pop` limit 1 | **" in out
    assert "| HTTP batch report 100 | **" in out
    assert "| ours limit 1 at 1M finished / at 0 finished | **" in out
    for anchored in ("pop 1", "push", "report"):  # the HTTP targets, against their anchor
        assert f"| HTTP {anchored} / plain view with token + permissions | **" in out
    assert "error(s)" not in out
    for package, row in (
        ("procrastinate", "| procrastinate `fetch_job` (its query, dict row, `Job`) | **"),
        ("procrastinate", "| procrastinate `procrastinate_fetch_job_v2`, id only | **"),
        ("pgqueuer", "| pgqueuer dequeue, batch 100 | **"),
    ):
        if importlib.util.find_spec(package) is None:
            assert f"{package} is not installed" in out
        else:
            assert row in out


def test_tick_bench__tiny_run_checks_what_it_materialised() -> None:
    out = run_bench("bench.tick_bench", "--schedules", "200", "--beat", "200")
    assert "## Idle tick (nothing due)" in out
    assert "ok: 2 tasks for 2 schedules, 0 still due" in out
    assert "| 200 | " in out  # beat's DatabaseScheduler row


def test_worker_bench__tiny_run_measures_latency_and_throughput() -> None:
    redis = os.environ.get("TEST_REDIS_URL", "")
    assert redis, "the PostgreSQL leg runs with scripts/with-redis.sh: TEST_REDIS_URL is missing"
    out = run_bench(
        "bench.worker_bench",
        *("--samples", "3", "--tasks", "20", "--warmup", "5", "--rounds", "1", "--no-embedded"),
    )
    assert "| PostgreSQL + Redis (PostgreSQL " in out
    assert "| 20 | `demo.echo` via `tasks.run_tasks` (up to 8 tasks a message)" in out
    assert "| 20 | `demo.echo` via `tasks.run_task` (one task a message), 1 worker" in out
    assert "(up to 8 tasks a message), report and next claim in one statement (opt-in), 1 wo" in out
    for variant in ("one task a message", "report and next claim in one statement (opt-in)"):
        assert "| 1 | " in out.split(f"| ours / {variant} |")[1]  # the before/after pair
    assert "failed" not in out


def test_worker_waits__tiny_run_times_the_stages_of_each_variant() -> None:
    assert os.environ.get("TEST_REDIS_URL", ""), "the PostgreSQL leg runs with with-redis.sh"
    out = run_bench(
        "bench.worker_waits",
        *("--tasks", "20", "--warmup", "5", "--rounds", "1", "--no-floor"),
        *("--variant", "async=WORKER_CLAIM_ASYNC_COMMIT=1"),
    )
    assert "| figure | ours/base | ours/async |" in out
    assert "| prerun>started | " in out
    assert "ours/async rounds tasks/s:" in out


def test_perf_worker_round__tiny_run_prints_each_path() -> None:
    assert os.environ.get("TEST_REDIS_URL", ""), "the PostgreSQL leg runs with with-redis.sh"
    out = run_bench("bench.perf_worker_round", "--rounds", "2", "--size", "3")
    for path in ("round, ORM", "round, one query", "messages, send_task", "messages, round_sender"):
        assert f"| {path} | " in out


def test_perf_worker_claim__tiny_run_completes_every_task_and_prints_its_cpu() -> None:
    assert os.environ.get("TEST_REDIS_URL", ""), "the PostgreSQL leg runs with with-redis.sh"
    out = run_bench("bench.perf_worker_claim", "--tasks", "60", "--batches", "2")
    assert "2 batches of 60 tasks, 120 completed;" in out  # the refills kept the list fed
    assert "| execute | " in out
    for path in ("batch, one statement", "batch, two statements"):
        [row] = [line for line in out.splitlines() if line.startswith(f"| {path} | ")]
        assert row.endswith("| 120 |"), row  # every task completed on that path too


def test_perf_longpoll__tiny_interleaved_run_prints_both_trees_and_their_ratio() -> None:
    """Its own tree as the --base too: the rounds alternate the two gunicorns, each push is
    popped by a waiting runner, and both tables and the ratio of the medians are printed."""
    out = run_bench(
        "bench.perf_longpoll",
        *("--base", str(ROOT), "--rounds", "2", "--pushes", "3", "--runners", "2"),
        *("--idle", "0.05", "--wait", "1", "--workers", "1", "--threads", "4"),
    )
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("round")] == [
        "round 1 base",
        "round 1 new",
        "round 2 new",
        "round 2 base",
    ]
    for tree in ("base", "new"):
        assert f"{tree}: 2 runners waiting" in out and "(2 x 3)" in out
    assert out.count("| push sent → popped by a waiting runner | ") == 2
    assert out.count("| of which: → woken pop statement | ") == 2
    assert "new/base" in out
