"""The tick bench's report: its result records and the markdown made from them.
Formatting only; bench/tick_bench.py measures."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bench.common import percentile, uptime

WARMUP_TICKS = 3
IDLE_TICKS = 30
CONCURRENT = 4
TARGET_IDLE_MS = 50.0
# Flat: the idle median at the largest size is at most 1.5 times that at 10,000, or at most
# 2 ms above it (ticks take about a millisecond: a ratio alone would judge the noise).
TARGET_FLAT = 1.5
TARGET_FLAT_MS = 2.0
TARGET_MATERIALISE_S = 5.0  # for 10,000 due; pro rata for other counts
TARGET_RSS_MB = 200.0


@dataclass(frozen=True)
class Check:
    tasks: int
    distinct_schedules: int
    queued: int
    still_due: int

    def ok(self, due: int) -> bool:
        return self.tasks == self.distinct_schedules == self.queued == due and not self.still_due

    def describe(self, due: int) -> str:
        verdict = "ok" if self.ok(due) else "WRONG"
        return (
            f"{verdict}: {self.tasks:,} tasks for {self.distinct_schedules:,} schedules, "
            f"{self.still_due:,} still due"
        )


# --- results ---------------------------------------------------------------------------------


@dataclass
class IdlePoint:
    schedules: int
    report: dict[str, Any]
    plan: str

    @property
    def median_ms(self) -> float:
        return statistics.median(self.report["samples"]) * 1000

    @property
    def p95_ms(self) -> float:
        return percentile(self.report["samples"], 0.95) * 1000


@dataclass
class MaterialiseRun:
    label: str
    due: int
    processes: int
    wall: float
    returned: int
    check: Check
    rss_peak_kib: int


@dataclass
class BeatPoint:
    rows: int
    report: dict[str, Any]

    @property
    def later_s(self) -> float:
        return statistics.median(self.report["later"])


@dataclass
class Run:
    args: argparse.Namespace
    started: float = field(default_factory=time.monotonic)
    load_start: str = ""
    pg_version: str = ""
    idle: dict[int, IdlePoint] = field(default_factory=dict)
    materialised: list[MaterialiseRun] = field(default_factory=list)
    beat: dict[int, BeatPoint] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def mib(kib: int) -> float:
    return kib / 1024


def idle_table(run: Run) -> list[str]:
    lines = [
        "| schedules | median ms | p95 ms | max ms | first tick in a fresh process ms "
        "| queries/tick | client CPU ms/tick | due check: index, buffers | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for size in sorted(run.idle):
        point = run.idle[size]
        report = point.report
        lines.append(
            f"| {size:,} | {point.median_ms:.2f} | {point.p95_ms:.2f} "
            f"| {max(report['samples']) * 1000:.2f} | {report['cold'] * 1000:.1f} "
            f"| {report['queries']} | {report['cpu'] * 1000:.2f} | {point.plan} "
            f"| {mib(report['rss_peak_kib']):.0f} |"
        )
    return lines


def materialise_table(run: Run) -> list[str]:
    lines = [
        "| run | schedules | due | wall s | schedules/s | tasks returned | check "
        "| peak RSS MB (per process) |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for m in run.materialised:
        rate = m.due / m.wall if m.wall else math.nan
        lines.append(
            f"| {m.label} | {run.args.schedules:,} | {m.due:,} | {m.wall:.2f} | {rate:,.0f} "
            f"| {m.returned:,} | {m.check.describe(m.due)} | {mib(m.rss_peak_kib):.0f} |"
        )
    return lines


def ours_at(run: Run, size: int) -> IdlePoint | None:
    return run.idle.get(size)


def beat_table(run: Run) -> list[str]:
    lines = [
        "| PeriodicTask rows | load s | first tick s | later tick s (median of 3) "
        "| tick after a change s | RSS after load MB | peak RSS MB "
        "| our idle tick ms, same size | beat later tick / ours |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows in sorted(run.beat):
        point = run.beat[rows]
        report = point.report
        ours = ours_at(run, rows)
        ours_ms = f"{ours.median_ms:.2f}" if ours else "-"
        ratio = f"{point.later_s * 1000 / ours.median_ms:,.0f}x" if ours else "-"
        lines.append(
            f"| {rows:,} | {report['load']:.2f} | {report['first']:.3f} | {point.later_s:.3f} "
            f"| {report['changed']:.2f} | {mib(report['rss_loaded_kib']):.0f} "
            f"| {mib(report['rss_peak_kib']):.0f} "
            f"| {ours_ms} | {ratio} |"
        )
    return lines


def beat_summary(run: Run) -> list[str]:
    if not run.beat or not run.idle:
        return []
    rows, size = max(run.beat), max(run.idle)
    beat, ours = run.beat[rows], run.idle[size]
    sent = [r for r, p in run.beat.items() if p.report["sent"]]
    lines = [
        f"Our idle tick at {size:,} schedules ({ours.median_ms:.2f} ms) against beat's later "
        f"tick at {rows:,} rows ({beat.later_s * 1000:,.0f} ms): beat is "
        f"{beat.later_s * 1000 / ours.median_ms:,.0f} times slower with {size / rows:g} times "
        f"fewer entries; its load takes {beat.report['load']:.1f} s, ours has none "
        f"(first tick in a fresh process: {ours.report['cold'] * 1000:.0f} ms).",
    ]
    if sent:
        lines.append(f"WARNING: beat sent something at {sent} rows; nothing should be due.")
    return lines


def target_row(figure: str, target: str, measured: str, met: bool) -> str:
    return f"| {figure} | {target} | {measured} | {'yes' if met else 'NO'} |"


def targets_table(run: Run) -> list[str]:
    lines = ["| figure | target | measured | met |", "|---|---:|---:|---|"]
    idle_target = f"≤ {TARGET_IDLE_MS:g} ms"
    for size in sorted(run.idle):
        median = run.idle[size].median_ms
        figure = f"idle tick at {size:,} schedules, median"
        lines.append(target_row(figure, idle_target, f"{median:.2f} ms", median <= TARGET_IDLE_MS))
    sizes = sorted(run.idle)
    if len(sizes) > 1:
        large, small = run.idle[sizes[-1]].median_ms, run.idle[sizes[0]].median_ms
        ratio, extra = large / small, large - small
        figure = f"flat: idle median at {sizes[-1]:,} against at {sizes[0]:,}"
        target = f"≤ {TARGET_FLAT:g}x or ≤ +{TARGET_FLAT_MS:g} ms"
        met = ratio <= TARGET_FLAT or extra <= TARGET_FLAT_MS
        lines.append(target_row(figure, target, f"{ratio:.2f}x, {extra:+.2f} ms", met))
    for m in run.materialised:
        target = TARGET_MATERIALISE_S * m.due / 10_000
        met = m.wall <= target and m.check.ok(m.due)
        figure = f"{m.due:,} due materialised, {m.label}"
        lines.append(target_row(figure, f"≤ {target:g} s", f"{m.wall:.2f} s", met))
    peaks = [p.report["rss_peak_kib"] for p in run.idle.values()]
    peak = mib(max(peaks + [m.rss_peak_kib for m in run.materialised]))
    rss_target = f"≤ {TARGET_RSS_MB:g} MB"
    figure = "peak RSS of a tick process"
    lines.append(target_row(figure, rss_target, f"{peak:.0f} MB", peak <= TARGET_RSS_MB))
    return lines


def report(run: Run) -> str:
    import django

    args = run.args
    lines = [
        "# Orchestrator tick benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {run.pg_version}, Django "
        f"{django.get_version()}, {os.cpu_count()} CPUs, DEBUG={os.environ.get('DEBUG')}; "
        f"{args.schedules:,} hourly interval schedules in one scheduler (default policy "
        f"weights, batch 500); total {time.monotonic() - run.started:.0f} s.",
        "",
        f"Load at the start: `{run.load_start}`; at the end: `{uptime()}`. Other work on the "
        "machine depresses every figure.",
        "",
        "## Idle tick (nothing due)",
        "",
        *idle_table(run),
        "",
        f"{IDLE_TICKS} ticks after {WARMUP_TICKS} warm-up ticks, each in a freshly spawned "
        "process. Buffers = pages the due check (`queries.schedulers_with_due`) touched, "
        "from EXPLAIN (ANALYZE, BUFFERS): the size-independent part of the cost.",
        "",
        "## Materialising due schedules",
        "",
        *materialise_table(run),
        "",
        "One `services.orchestrate()` call per process (it loops in batches of 500 until "
        "nothing is due). Check: one QUEUED task per due schedule, no schedule left due.",
        "",
        "## django-celery-beat DatabaseScheduler (nothing due)",
        "",
        *beat_table(run),
        "",
        *beat_summary(run),
        "",
        "load = `DatabaseScheduler(app=app, lazy=False)`, which reads every enabled row into "
        "memory; first tick builds its heap; later ticks compare the whole schedule with its "
        "last copy; a tick after a change (`PeriodicTasks.update_changed()`, what any edit of "
        "a row does, and forced every 5 minutes) reloads every row and rebuilds the heap. "
        "Each size in a fresh process.",
        "",
        "## Targets",
        "",
        *targets_table(run),
    ]
    if run.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in run.notes)]
    return "\n".join(lines) + "\n"


def profile_text(due: int, report: dict[str, Any], plans: str) -> str:
    sql = report["sql"]
    lines = [
        f"materialised {report['made']:,} of {due:,} due in {report['seconds']:.2f} s "
        f"(under cProfile); {uptime()}",
        "",
        "statements by kind: count, seconds",
    ]
    for kind, (count, seconds) in sql["totals"].items():
        lines.append(f"  {kind}: {count}, {seconds:.2f}")
    due_ms = ", ".join(f"{ms:.0f}" for ms in sql["due_ms"])
    lines += [
        "",
        "due_schedules statements in order (each batch: one per policy with a share), "
        f"ms: {due_ms}",
        "",
        plans,
        report["profile"],
    ]
    return "\n".join(lines)
