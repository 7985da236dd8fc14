"""Run a function in several forked processes at once against the real test database.

Each child opens its own database connection (the parent's are closed before forking), waits
on a barrier so they all start together, and sends back its result or its exception text.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any

from django.db import connections

_FORK = multiprocessing.get_context("fork")


def _child(
    target: Callable[..., Any],
    index: int,
    barrier: Any,
    results: Any,
    args: tuple[Any, ...],
) -> None:
    try:
        barrier.wait(timeout=60)
        results.put((index, "ok", target(index, *args)))
    except BaseException:
        results.put((index, "error", traceback.format_exc()))
    finally:
        connections.close_all()


def shared_barrier(count: int) -> Any:
    """A barrier the children of one `run_in_processes` call can meet at, to move in lockstep."""
    return _FORK.Barrier(count)


def run_in_processes(
    count: int, target: Callable[..., Any], *args: Any, timeout: float = 300
) -> list[Any]:
    """Call `target(index, *args)` in `count` processes at once; return results by index."""
    connections.close_all()
    barrier = _FORK.Barrier(count)
    results = _FORK.Queue()
    processes = [
        _FORK.Process(target=_child, args=(target, index, barrier, results, args))
        for index in range(count)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    errors: list[str] = []
    for _ in processes:
        index, state, value = results.get(timeout=timeout)
        if state == "ok":
            collected[index] = value
        else:
            errors.append(f"process {index}:\n{value}")
    for process in processes:
        process.join(timeout=30)
    if errors:
        raise AssertionError("\n".join(errors))
    return [collected[index] for index in range(count)]
