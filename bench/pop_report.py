"""The pop bench's report: markdown tables from the rounds' cell results, ready to paste into
the README's Benchmarks section. Formatting only; bench/pop_bench.py measures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bench.cells import CellResult
from bench.common import fmt, markdown_table, median, ratio, spread


@dataclass(frozen=True)
class Entry:
    key: str
    label: str
    database_side: str  # "own" (the process's backend) or "other" (the server's backends)


@dataclass
class Run:
    entries: list[Entry]
    results: dict[str, list[CellResult]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    header: list[str] = field(default_factory=list)
    load: str = ""
    command: str = ""


# (ours, theirs, what, target as a fraction: ours / theirs at least this)
RATIOS = (
    # procrastinate's fetch as its worker makes it (the job's row and a Job), as ours hands
    # a whole Task back; the id-only call beside it, which is less work than a hand-out.
    ("ours-1", "procrastinate-1", "ours limit 1 / procrastinate fetch_job", 1.0),
    ("ours-1", "procrastinate-id-1", "ours limit 1 / procrastinate fetch, id only", math.nan),
    ("ours-1-1m", "ours-1", "ours limit 1 at 1M finished / at 0 finished", 0.9),
    ("ours-100", "pgqueuer-100", "ours limit 100 / pgqueuer batch 100", 1.0),
    ("ours-1", "pgqueuer-1", "ours limit 1 / pgqueuer batch 1", math.nan),
    ("ours-1", "raw-1", "ours limit 1 / lean raw loop", math.nan),
    ("ours-100", "raw-100", "ours limit 100 / lean raw loop batch 100", math.nan),
    ("ours-100-1m", "ours-100", "ours limit 100 at 1M finished / at 0 finished", 0.9),
    # The HTTP targets' anchor: the plain view doing the same work, token check, permission
    # and queue reach included (bench/plain_views.py); the ratio to the bare view beside it.
    ("http-pop-1", "plain-auth-pop-1", "HTTP pop 1 / plain view with token + permissions", 0.9),
    ("http-push-1", "plain-auth-push-1", "HTTP push / plain view with token + permissions", 0.9),
    (
        "http-report-1",
        "plain-auth-report-1",
        "HTTP report / plain view with token + permissions",
        0.9,
    ),
    ("http-pop-1", "plain-pop-1", "HTTP pop 1 / plain view without auth", math.nan),
    ("http-push-1", "plain-push-1", "HTTP push / plain view without auth", math.nan),
    ("http-report-1", "plain-report-1", "HTTP report / plain view without auth", math.nan),
    (
        "plain-auth-pop-1",
        "plain-pop-1",
        "plain view, pop: with token + permissions / without",
        math.nan,
    ),
    (
        "http-pop-100",
        "plain-auth-pop-100",
        "HTTP pop 100 / plain view with token + permissions",
        0.9,
    ),
    ("http-pop-100", "plain-pop-100", "HTTP pop 100 / plain view without auth", math.nan),
    ("http-pop-1", "ours-1", "HTTP pop 1 / the service call", math.nan),
)


def rates(results: Sequence[CellResult]) -> list[float]:
    return [r.rate for r in results if not r.errors]


def cpu_ms(results: Sequence[CellResult], side: str) -> float:
    """Median over the rounds of one side's CPU ms per call."""
    return median(r.per_call_ms(getattr(r, side)) for r in results if not r.errors)


def own_backend_ms(results: Sequence[CellResult], entry: Entry) -> str:
    return fmt(cpu_ms(results, "backend_cpu"), 2) if entry.database_side == "own" else "-"


def throughput_rows(run: Run) -> list[list[str]]:
    rows = []
    for entry in run.entries:
        results = run.results.get(entry.key, [])
        if not results:
            continue
        items = median(r.items for r in results)
        calls = median(r.calls for r in results)
        server = cpu_ms(results, "server_cpu")
        capped = sum(r.capped for r in results)
        errors = [e for r in results for e in r.errors]
        note = f"{capped} round(s) stopped at the time cap" if capped else ""
        if errors:
            note = f"{len(errors)} error(s): {errors[0][:120]}".replace("|", "/")
        rows.append(
            [
                entry.label,
                f"**{fmt(median(rates(results)))}**",
                spread(rates(results)),
                f"{fmt(items)} / {fmt(calls)}",
                fmt(cpu_ms(results, "client_cpu"), 2),
                own_backend_ms(results, entry),
                fmt(cpu_ms(results, "cluster_cpu"), 2),
                fmt(server, 2) if server > 0 else "-",
                note,
            ]
        )
    return rows


def round_ratios(run: Run, ours: str, theirs: str) -> list[float]:
    """ours / theirs within each round (the same minutes of the same machine)."""
    pairs = zip(run.results.get(ours, []), run.results.get(theirs, []), strict=False)
    return [a.rate / b.rate for a, b in pairs if not a.errors and not b.errors and b.rate > 0]


def ratio_rows(run: Run) -> list[list[str]]:
    rows = []
    for ours, theirs, what, target in RATIOS:
        per_round = round_ratios(run, ours, theirs)
        if not per_round:
            continue
        middle = median(per_round)
        if math.isnan(target):
            verdict = ""
        else:
            verdict = f"≥ {target:g}x: {'yes' if middle >= target else 'NO'}"
        of_medians = ratio(median(rates(run.results[ours])), median(rates(run.results[theirs])))
        low, high = min(per_round), max(per_round)
        cpu = _cpu_ratio(run, ours, theirs)
        rows.append([what, f"**{middle:.2f}x**", f"{low:.2f}-{high:.2f}", of_medians, cpu, verdict])
    return rows


def _cpu_ratio(run: Run, ours: str, theirs: str) -> str:
    """Between two HTTP cells: the peer's gunicorn CPU per call over ours, what the rate ratio
    tends to on a machine too loaded for its rates to mean much ("-" elsewhere)."""
    mine, peer = (cpu_ms(run.results[key], "server_cpu") for key in (ours, theirs))
    return f"{peer / mine:.2f}x" if mine > 0 and peer > 0 else "-"


def report(run: Run) -> str:
    lines = [
        "# Pop, push and report: ours side by side with its peers",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. " + " ".join(run.header),
        "",
        f"Load during the rounds: {run.load}.",
        "",
        "## Throughput (median of the interleaved rounds)",
        "",
        *markdown_table(
            (
                "path",
                "items/s",
                "min-max",
                "items / calls a round",
                "CPU ms a call: client",
                "its backend",
                "whole database",
                "gunicorn",
                "note",
            ),
            throughput_rows(run),
        ),
        "",
        "Items = tasks popped, pushed or reported; calls include each process's last, empty "
        "one. CPU ms per call, medians over the rounds: client = getrusage of the measuring "
        "processes; its backend = /proc/<pid>/stat of the PostgreSQL backend serving each "
        "client's connection (direct paths only); whole database = the cluster's process tree "
        "from /proc (every backend, gunicorn's too, and the WAL writer, checkpointer, "
        "autovacuum: the durable commit's cost); gunicorn = master and workers, from /proc.",
        "",
        "## Ratios (median of the per-round ratios)",
        "",
        *markdown_table(
            (
                "ours / peer",
                "median",
                "min-max",
                "ratio of the medians",
                "gunicorn CPU a call, peer / ours",
                "target",
            ),
            ratio_rows(run),
        ),
    ]
    if run.left_out:
        lines += ["", "Left out:", *(f"- {k}: {why}" for k, why in run.left_out.items())]
    lines += ["", f"Run: `{run.command}`"]
    return "\n".join(lines) + "\n"
