"""The worker bench's report: markdown from the legs' results. Formatting only."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

from bench.common import percentile, uptime
from bench.worker_setup import (
    HANDLER,
    LATENCY_WARMUP,
    NOOP_TASK,
    PAUSE_SECONDS,
    POLL_DEPTH_SECONDS,
    RESCUE_AFTER_SECONDS,
    TARGET_P50_MS,
    TARGET_P99_MS,
    TARGET_RATE,
    THROUGHPUT_CONCURRENCY,
    FloorResult,
    LatencyResult,
    Run,
    ThroughputResult,
    sessions_text,
)

R = TypeVar("R", ThroughputResult, FloorResult)


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def latency_table(results: list[LatencyResult]) -> list[str]:
    lines = [
        "| database + broker | worker | samples | p50 ms | p90 ms | p99 ms | max ms "
        "| fast path missed | PostgreSQL sessions opened |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.error:
            error = (r.error.splitlines() or [""])[0][:160].replace("|", "/")
            lines.append(f"| {r.label} | - | 0 | - | - | - | - | - | {error} |")
            continue
        lat = r.latencies_ms()
        missed = sum(s.rescued for s in r.samples)
        lost = f" ({r.lost} lost)" if r.lost else ""
        lines.append(
            f"| {r.label} ({r.database}) | {r.worker} | {len(lat)}{lost} "
            f"| {fmt(percentile(lat, 0.5))} | {fmt(percentile(lat, 0.9))} "
            f"| {fmt(percentile(lat, 0.99))} | {fmt(max(lat, default=math.nan))} | {missed} "
            f"| {sessions_text(r.sessions, len(r.samples) + r.lost + LATENCY_WARMUP)} |"
        )
    return lines


LATENCY_STEPS = (
    ("push start → DISPATCHED event", lambda s: s.dispatched - s.push_start),
    ("DISPATCHED → push returned (commit, send)", lambda s: s.push_return - s.dispatched),
    ("push returned → worker received", lambda s: s.received - s.push_return),
    ("worker received → RUNNING event", lambda s: s.running - s.received),
    ("RUNNING → COMPLETED", lambda s: s.completed - s.running),
)


def latency_steps_table(results: list[LatencyResult]) -> list[str]:
    measured = [r for r in results if r.samples]
    if not measured:
        return []
    lines = [
        "| step, ms (p50 / p90 / p99) | " + " | ".join(r.label for r in measured) + " |",
        "|---|" + "---:|" * len(measured),
    ]
    for name, step in LATENCY_STEPS:
        cells = []
        for r in measured:
            values = [step(s) * 1000 for s in r.samples]
            cells.append(
                f"{fmt(percentile(values, 0.5))} / {fmt(percentile(values, 0.9))} "
                f"/ {fmt(percentile(values, 0.99))}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def throughput_table(
    t: ThroughputResult | None,
    floor: FloorResult | None,
    peer: FloorResult | None = None,
    variants: Sequence[tuple[str, ThroughputResult | None]] = (),
) -> list[str]:
    worker = f"1 worker, --pool prefork --concurrency {THROUGHPUT_CONCURRENCY}"
    lines = [
        "| tasks | what runs | dispatch_threshold | wall s | tasks/s | steady tasks/s (10-90 %) "
        "| deepest broker, sampled | deepest broker, from events | not completed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, ours in (("", t), *variants):
        if ours is None:
            continue
        unfinished = ", ".join(f"{s} {n}" for s, n in sorted(ours.unfinished.items())) or "none"
        what = _messages(ours.message_batch) + (
            f", {label}" if label and ours.message_batch > 1 else ""
        )
        lines.append(
            f"| {ours.tasks:,} | `{HANDLER}` via {what}, {worker} "
            f"| {ours.threshold} "
            f"| {fmt(ours.wall, 2)} | {fmt(ours.rate, 0)} | {fmt(ours.steady_rate(), 0)} "
            f"| {max(ours.depth_samples, default=0)} | {ours.max_depth_events} | {unfinished} |"
        )
    peers = (
        (floor, f"Celery floor: `{NOOP_TASK}` (no database), {worker}"),
        (peer, f"procrastinate worker: a no-op async task, {THROUGHPUT_CONCURRENCY} "
         "`procrastinate worker` processes, concurrency 1"),
    )  # fmt: skip
    for result, what in peers:
        if result is not None:
            missing = result.tasks - result.completed
            lines.append(
                f"| {result.tasks:,} | {what} | - | {fmt(result.wall, 2)} | {fmt(result.rate, 0)} "
                f"| - | - | - | {f'{missing:,} not seen' if missing else 'none'} |"
            )
    return lines


def _messages(batch: int) -> str:
    if batch <= 1:
        return "`tasks.run_task` (one task a message)"
    return f"`tasks.run_tasks` (up to {batch} tasks a message)"


def variant_table(run: Run, label: str) -> list[str]:
    """Ours against one variant of it, round by round (each pair back to back): tasks/s and
    CPU ms a task of the worker, PostgreSQL and Redis; then the medians."""
    lines = [
        f"| round | ours tasks/s | {label} | ours / {label} "
        "| worker CPU ms a task, ours / variant | PostgreSQL | Redis |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    rows: list[list[float]] = []
    pairs = zip(run.throughput, run.variants.get(label, []), strict=False)
    for number, (new, old) in enumerate(pairs):
        values = [new.rate, old.rate, new.rate / old.rate if old.rate else math.nan]
        for side in ("worker", "postgres", "redis"):
            values += [new.cpu_ms_per_task(side), old.cpu_ms_per_task(side)]
        rows.append(values)
        lines.append(f"| {number + 1} | " + " | ".join(_batching_cells(values)) + " |")
    if rows:
        medians = [_median([row[i] for row in rows]) for i in range(len(rows[0]))]
        cells = " | ".join(f"**{c}**" for c in _batching_cells(medians))
        lines.append(f"| **median** | {cells} |")
    return lines


def _batching_cells(v: Sequence[float]) -> list[str]:
    pairs = [f"{fmt(v[i], 2)} / {fmt(v[i + 1], 2)}" for i in (3, 5, 7)]
    return [fmt(v[0], 0), fmt(v[1], 0), f"{fmt(v[2], 2)}x", *pairs]


def throughput_steps_table(t: ThroughputResult) -> list[str]:
    service_ms = THROUGHPUT_CONCURRENCY * t.wall / t.completed * 1000 if t.completed else math.nan
    rows = [
        (
            "DISPATCHED → RUNNING (in the broker, or behind its batch's earlier tasks)",
            t.step_ms("DISPATCHED", "RUNNING"),
        ),
        ("RUNNING → COMPLETED (claimed to reported)", t.step_ms("RUNNING", "COMPLETED")),
        (
            "message body (worker log, `succeeded in`; a `tasks.run_tasks` runs several tasks)",
            [s * 1000 for s in t.body_seconds],
        ),
    ]
    lines = ["| per task | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|"]
    for name, values in rows:
        lines.append(
            f"| {name} | {fmt(percentile(values, 0.5), 2)} | {fmt(percentile(values, 0.9), 2)} "
            f"| {fmt(percentile(values, 0.99), 2)} |"
        )
    lines.append(
        f"| wall time per task per pool process ({THROUGHPUT_CONCURRENCY} x wall / tasks) "
        f"| {fmt(service_ms, 2)} | | |"
    )
    return lines


SIDES = ("worker", "postgres", "redis", "bench")


def cpu_row(label: str, cpu: dict[str, float], completed: int) -> str:
    def per_task(name: str) -> str:
        return fmt(cpu[name] / completed * 1000, 2) if name in cpu and completed else "-"

    pipeline = sum(cpu.get(s, 0.0) for s in SIDES[:3])
    accounted = pipeline + cpu.get("bench", 0.0)
    total = cpu.get("machine_total", math.nan)
    other = max(0.0, cpu.get("machine_busy", 0.0) - accounted) / total if total > 0 else math.nan
    cpus = os.cpu_count() or 1
    ceiling = cpus * completed / accounted if accounted else math.nan
    ceiling_pipeline = cpus * completed / pipeline if pipeline else math.nan
    return (
        f"| {label} | {per_task('worker')} | {per_task('postgres')} | {per_task('redis')} "
        f"| {per_task('bench')} | {fmt(other * 100, 0)} | {fmt(ceiling, 0)} "
        f"| {fmt(ceiling_pipeline, 0)} |"
    )


def median_cpu(results: Sequence[ThroughputResult | FloorResult]) -> tuple[dict[str, float], int]:
    """CPU seconds by side of the round with the median worker CPU per task, and its tasks."""
    done = [r for r in results if r.completed]
    if not done:
        return {}, 0
    ranked = sorted(done, key=lambda r: r.cpu_ms_per_task("worker"))
    middle = ranked[len(ranked) // 2]
    return middle.cpu, middle.completed


def cpu_table(run: Run) -> list[str]:
    lines = [
        "| run (median round) | worker (main + pool) | PostgreSQL (all backends) | Redis "
        "| bench (dispatcher, polling; or producer) | other work on the machine % "
        "| CPU-bound ceiling tasks/s | same, worker + PostgreSQL + Redis only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, results in (
        (f"`{HANDLER}`", run.throughput),
        ("Celery floor", run.floor),
        ("procrastinate worker", run.peer),
    ):
        cpu, completed = median_cpu(results)
        if completed:
            lines.append(cpu_row(label, cpu, completed))
    return lines


def rounds_table(run: Run) -> list[str]:
    """Each round's tasks/s of the three contenders, their ratios and the load after it; then
    the medians (of each column, so a median ratio is the median of the rounds' ratios)."""
    lines = [
        "| round | ours tasks/s | procrastinate's worker | Celery alone | ours / procrastinate "
        "| ours / Celery | ours worker CPU ms a task | load average after the round |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    columns: list[list[float]] = [[] for _ in range(6)]
    for number in range(len(run.loads)):
        ours, peer, floor = (_nth(x, number) for x in (run.throughput, run.peer, run.floor))
        values = [ours, peer, floor, ours / peer, ours / floor]
        values.append(_nth_cpu(run.throughput, number))
        for column, value in zip(columns, values, strict=True):
            column.append(value)
        load = run.loads[number].split("load average:")[-1].strip()
        lines.append(f"| {number + 1} | " + " | ".join(_cells(values)) + f" | {load} |")
    medians = [_median(c) for c in columns]
    lines.append("| **median** | " + " | ".join(f"**{c}**" for c in _cells(medians)) + " | |")
    return lines


def median_round(results: Sequence[R]) -> R | None:
    """The round whose tasks/s is the median (the upper one of an even count)."""
    ranked = sorted(results, key=lambda r: r.rate if not math.isnan(r.rate) else -1.0)
    return ranked[len(ranked) // 2] if ranked else None


def _nth(results: Sequence[ThroughputResult | FloorResult], number: int) -> float:
    return results[number].rate if number < len(results) else math.nan


def _nth_cpu(results: Sequence[ThroughputResult], number: int) -> float:
    return results[number].cpu_ms_per_task("worker") if number < len(results) else math.nan


def _cells(values: Sequence[float]) -> list[str]:
    return (
        [fmt(v, 0) for v in values[:3]]
        + [f"{fmt(v, 2)}x" for v in values[3:5]]
        + [fmt(v, 2) for v in values[5:]]
    )


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def median_ratio(run: Run, peers: Sequence[FloorResult]) -> float:
    ratios = [
        ours.rate / peer.rate
        for ours, peer in zip(run.throughput, peers, strict=False)
        if peer.rate > 0
    ]
    return _median(ratios)


def target_row(figure: str, target: str, measured: float, unit: str, met: bool) -> str:
    value = "-" if math.isnan(measured) else f"{measured:,.0f} {unit}"
    return f"| {figure} | {target} | {value} | {'yes' if met else 'NO'} |"


def targets_table(latency: list[LatencyResult], t: ThroughputResult | None) -> list[str]:
    lines = ["| figure | target | measured | met |", "|---|---:|---:|---|"]
    for r in latency:
        lat = r.latencies_ms()
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        lines.append(
            target_row(
                f"push → RUNNING p50, {r.label}",
                f"≤ {TARGET_P50_MS:g} ms",
                p50,
                "ms",
                p50 <= TARGET_P50_MS,
            )
        )
        lines.append(
            target_row(
                f"push → RUNNING p99, {r.label}",
                f"≤ {TARGET_P99_MS:g} ms",
                p99,
                "ms",
                p99 <= TARGET_P99_MS,
            )
        )
    if t is not None:
        lines.append(
            target_row(
                f"no-op tasks/s, {THROUGHPUT_CONCURRENCY} worker processes, PostgreSQL + Redis",
                f"≥ {TARGET_RATE:g}",
                t.rate,
                "tasks/s",
                t.rate >= TARGET_RATE,
            )
        )
    return lines


def ratio_rows(run: Run) -> list[str]:
    """Ours against procrastinate's worker and Celery alone: the median of the rounds' ratios
    (each round's contenders ran back to back)."""
    rows = []
    for peers, label, target in (
        (run.peer, "procrastinate's worker", 1.2),
        (run.floor, "Celery alone (the floor)", 0.5),
    ):
        ratio = median_ratio(run, peers)
        if math.isnan(ratio):
            continue
        rows.append(
            f"| no-op tasks/s, ours / {label} (median of {len(run.loads)} rounds) "
            f"| ≥ {target:g}x | {ratio:.2f}x | {'yes' if ratio >= target else 'NO'} |"
        )
    return rows


def observations(run: Run) -> list[str]:
    """What the figures say about themselves: connection churn, and the CPU cost per task
    against what the throughput target allows on this machine."""
    notes = []
    t, floor = median_round(run.throughput), median_round(run.floor)
    churn = [
        (r.label, r.sessions / (len(r.samples) + r.lost + LATENCY_WARMUP))
        for r in run.latency
        if r.sessions is not None and r.samples
    ]
    if t is not None and t.sessions is not None and t.completed:
        churn.append(("throughput", t.sessions / t.completed))
    if any(per_task >= 0.5 for _label, per_task in churn):
        where = ", ".join(f"{label} {per_task:.2f}" for label, per_task in churn)
        notes.append(
            f"PostgreSQL sessions opened per task: {where}. Celery's Django fixup closes every "
            "database connection before and after each task unless CELERY_DB_REUSE_MAX is set, "
            "so each task pays a new connection (a backend forked and warmed up) whatever "
            "CONN_MAX_AGE says."
        )
    if t is not None and t.completed and t.rate < TARGET_RATE:
        cpus = os.cpu_count() or 1
        pipeline = sum(t.cpu.get(side, 0.0) for side in SIDES[:3]) / t.completed * 1000
        budget = cpus * 1000 / TARGET_RATE
        floor_ms = (
            sum(floor.cpu.get(side, 0.0) for side in SIDES[:3]) / floor.completed * 1000
            if floor is not None and floor.completed
            else math.nan
        )
        notes.append(
            f"CPU per task: worker + PostgreSQL + Redis used {pipeline:.1f} CPU ms a "
            f"task, which caps {cpus} CPUs at {cpus * 1000 / pipeline:,.0f} tasks/s with nothing "
            f"else running; {TARGET_RATE:g} tasks/s allows {budget:.1f} ms a task, of which "
            f"Celery itself (the floor) takes {fmt(floor_ms, 1)} ms."
        )
    return notes


def profile_sections(run: Run) -> list[str]:
    """--profile: round 1's statements (pg_stat_statements) and the pool processes' profile."""
    lines: list[str] = []
    first = run.throughput[0] if run.throughput else None
    if first is not None and first.statements:
        lines += [
            "",
            "## Statements of round 1 (ours), by server time (pg_stat_statements)",
            "",
            "| calls a task | ms a task | rows a call | statement |",
            "|---:|---:|---:|---|",
            *first.statements,
        ]
    if run.profile:
        lines += ["", "## Profile of round 1's pool processes (cProfile)", "", "```"]
        lines += [run.profile.rstrip(), "```"]
    return lines


def _variants_section(run: Run) -> list[str]:
    lines: list[str] = []
    for label in run.variants:
        lines += [
            f"Ours, then ours with {label} (the code before this release's change; "
            "`bench.worker_bench.VARIANTS`) right after it in each round, on fresh worker "
            "processes:",
            "",
            *variant_table(run, label),
            "",
        ]
    return lines


def report(run: Run) -> str:
    import celery
    import django
    from django.conf import settings

    args = run.args
    lines = [
        "# Celery execution path benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {run.versions}, Django {django.get_version()}, "
        f"Celery {celery.__version__}, {os.cpu_count()} CPUs, production settings (DEBUG off) in "
        f"the workers and the bench, handler `{HANDLER}`; "
        f"total {time.monotonic() - run.started:.0f} s.",
        "",
        f"Load at the start: `{run.load_start}`; at the end: `{uptime()}`. Other work on the "
        "machine depresses every figure.",
        "",
        "## Push → RUNNING latency at idle, one worker",
        "",
        *latency_table(run.latency),
        "",
        f"From the start of the `services.task_push` call (whose on-commit fast path dispatches) "
        f"to the task's RUNNING event, one task at a time, a random "
        f"{PAUSE_SECONDS[0] * 1000:.0f}-{PAUSE_SECONDS[1] * 1000:.0f} ms pause after each one "
        f"finished; {LATENCY_WARMUP} warm-up pushes not counted. Fast path missed = still QUEUED "
        f"after {RESCUE_AFTER_SECONDS:g} s, dispatched by the bench. Sessions: connections "
        "PostgreSQL accepted over the leg (from pg_stat_database), per push.",
        "",
        "### Where the latency goes",
        "",
        *latency_steps_table(run.latency),
        "",
        "Event times are taken by the service before its UPDATE, in the process that makes it; "
        "`received` is the worker's Celery log line (millisecond stamps), so the two steps "
        "around it are ±1 ms.",
    ]
    t, floor = median_round(run.throughput), median_round(run.floor)
    if t is not None or floor is not None:
        lines += [
            "",
            "## Throughput of no-op tasks, PostgreSQL + Redis",
            "",
            f"{len(run.loads)} interleaved rounds (ours, procrastinate's worker, Celery alone; "
            "again), each contender on its own fresh worker processes:",
            "",
            *rounds_table(run),
            "",
            *_variants_section(run),
            "The median round of each contender:",
            "",
            *throughput_table(
                t,
                floor,
                median_round(run.peer),
                [(label, median_round(rs)) for label, rs in run.variants.items()],
            ),
            "",
        ]
    if t is not None:
        lines += [
            f"{t.tasks:,} QUEUED tasks bulk-created, then `dispatch.dispatch_all()` every "
            f"{settings.DISPATCH_INTERVAL_SECONDS} s (DISPATCH_INTERVAL_SECONDS, the production "
            f"cadence) from the bench ({t.dispatch_calls} calls, "
            f"each visiting the {t.celery_schedulers} unpaused celery schedulers, the pilots' "
            "included; "
            f"{t.dispatched_by_bench:,} tasks sent by them; the rest by the worker's on-claim "
            "fast path); wall = first dispatch to the last COMPLETED event. Deepest broker = "
            "most DISPATCHED tasks at once: sampled by the bench every "
            f"{POLL_DEPTH_SECONDS * 1000:.0f} ms, and replayed "
            "from the DISPATCHED and RUNNING events. PostgreSQL sessions opened meanwhile: "
            f"{sessions_text(t.sessions, t.completed)}.",
        ]
    if floor is not None:
        lines += [
            "",
            f"Celery floor: `{NOOP_TASK}` (a built-in task that returns its arguments) sent "
            f"{floor.tasks:,} times by one producer, through the same kind of worker; from the "
            "first send to the last `succeeded` log line. What Celery and Redis cost on this "
            "machine before any of our code runs.",
        ]
    if t is not None:
        lines += [
            "",
            "### Where the time goes",
            "",
            *throughput_steps_table(t),
            "",
            "CPU ms per task over the measured window, from /proc (process trees, so the "
            "PostgreSQL backends forked and gone meanwhile count too):",
            "",
            *cpu_table(run),
            "",
            "CPU-bound ceiling = tasks/s if all CPUs did nothing but these processes' work. "
            "The bench's CPU is its dispatcher (as beat's periodic job would run it) and its "
            f"status poll every {POLL_DEPTH_SECONDS * 1000:.0f} ms.",
        ]
    lines += ["", "## Targets", "", *targets_table(run.latency, t), *ratio_rows(run)]
    notes = [*run.notes, *observations(run)]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    lines += profile_sections(run)
    lines += [
        "",
        f"Run: `python -m bench.worker_bench{' --quick' if args.quick else ''}` "
        f"({args.samples} latency samples, {args.tasks:,} throughput tasks a round, "
        f"{len(run.loads)} rounds{', profiled' if args.profile else ''}).",
    ]
    return "\n".join(lines) + "\n"
