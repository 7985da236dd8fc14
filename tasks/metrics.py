"""Latency histograms of the queue, recorded where the work happens (served at /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

POP_SECONDS = Histogram(
    "scheduler_pop_seconds",
    "Time to pop (lease) tasks, per call.",
    ["scheduler"],
    buckets=LATENCY_BUCKETS,
)
DISPATCH_SECONDS = Histogram(
    "scheduler_dispatch_seconds",
    "Time of one dispatch round of a celery queue.",
    ["scheduler"],
    buckets=LATENCY_BUCKETS,
)
TRANSITION_SECONDS = Histogram(
    "scheduler_transition_seconds",
    "Time of one task state transition (CAS + event).",
    ["to_status"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "scheduler_queue_wait_seconds",
    "From creation to RUNNING, when a worker claims a task.",
    ["scheduler"],
    buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
)


_CHILDREN: dict[tuple[int, Any], Any] = {}


def labelled(histogram: Histogram, value: str) -> Any:
    """histogram.labels(value), kept per process: labels() validates and takes a lock on each
    call, measured as a twentieth of a single-task pop's client CPU. Safe to keep: nothing
    removes a label set of these histograms (a child is only ever created and observed)."""
    key = (id(histogram), value)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = histogram.labels(value)
    return child
